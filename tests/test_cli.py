"""The ``protege`` command: clear one-line errors with a non-zero exit, and no half-written artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from protege.cli import app
from tiny import base_task, deep_merge, install_tiny_models, synthetic_rows, write_task

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: extra threads only spin


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default artifact folder is ./runs/<task>


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _one_error_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code != 0, result.output
    assert len(lines) == 1, f"expected one error line, got:\n{result.output}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def _no_artifacts(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    leftovers = [str(p.relative_to(tmp_path)) for p in runs.rglob("*")] if runs.exists() else []
    assert leftovers == [], leftovers


def test_help_lists_the_stages():
    r = _invoke("--help")
    assert r.exit_code == 0
    for cmd in ("generate", "curate", "train", "evaluate", "run", "demo"):
        assert cmd in r.output


def test_unknown_nested_key(tmp_path):
    p = write_task(tmp_path / "t", overrides={"teacher": {"temprature": 0.3}})
    line = _one_error_line(_invoke("generate", p))
    assert str(p) in line and "teacher.temprature" in line and "spelling" in line
    _no_artifacts(tmp_path)


def test_missing_required_key(tmp_path):
    spec = base_task()
    del spec["labels"]
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(spec), encoding="utf-8")
    line = _one_error_line(_invoke("generate", p))
    assert "bad.yaml" in line and "missing required key 'labels'" in line
    _no_artifacts(tmp_path)


def test_wrong_type(tmp_path):
    p = write_task(tmp_path / "t", overrides={"teacher": {"batch_size": "big"}})
    line = _one_error_line(_invoke("run", p))
    assert "teacher.batch_size" in line and "'big'" in line
    _no_artifacts(tmp_path)


def test_invalid_yaml_is_one_line_with_its_position(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nlabels: [a, b\ninstruction: hi\n", encoding="utf-8")
    line = _one_error_line(_invoke("generate", p))
    assert "bad.yaml" in line and "invalid YAML" in line and "line " in line
    _no_artifacts(tmp_path)


def test_non_utf8_task_file(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes(yaml.safe_dump(base_task()).replace("colour", "col\u00f6ur").encode("latin-1"))
    line = _one_error_line(_invoke("generate", p))
    assert "latin1.yaml" in line and "UTF-8" in line


def test_missing_task_file(tmp_path):
    line = _one_error_line(_invoke("generate", tmp_path / "nope.yaml"))
    assert "nope.yaml" in line and "not found" in line


def test_bad_gold_row_names_the_row_and_writes_nothing(tmp_path):
    gold = synthetic_rows(6, start=100)
    gold[4]["label"] = "purple"
    p = write_task(tmp_path / "t", gold=gold)
    line = _one_error_line(_invoke("generate", p))
    assert "gold.jsonl" in line and "row 5" in line and "'purple'" in line
    _no_artifacts(tmp_path)


def test_bad_inputs_file_with_explicit_out(tmp_path):
    p = write_task(tmp_path / "t")
    (tmp_path / "t" / "inputs.jsonl").write_text('{"text": "a"}\n{"text": "b"\n', encoding="utf-8")
    out = tmp_path / "elsewhere"
    line = _one_error_line(_invoke("run", p, "--out", out))
    assert "inputs.jsonl" in line and "line 2" in line
    assert not out.exists() or not any(out.iterdir())


def test_stage_before_its_upstream(tmp_path):
    p = write_task(tmp_path / "t")
    line = _one_error_line(_invoke("curate", p))
    assert "protege generate" in line


def test_run_then_a_failing_stage_keeps_the_finished_artifact(tmp_path, monkeypatch):
    calls = install_tiny_models(monkeypatch)
    p = write_task(tmp_path / "t", n_inputs=24, n_gold=9)
    out = tmp_path / "runs" / "tiny-colors"
    r = _invoke("run", p)
    assert r.exit_code == 0, r.output
    assert "retained" in r.output and "speedup" in r.output
    report = json.loads((out / "report.json").read_text())
    assert report["n_eval"] == 9 and calls.answered == 24 + 9

    # curate everything away: train must refuse, and the previous student stays as it was
    student_cfg = (out / "train" / "config.json").read_bytes()
    p.write_text(p.read_text().replace("min_confidence: 0.0", "min_confidence: 1.0"), encoding="utf-8")
    r = _invoke("curate", p)
    assert r.exit_code == 0, r.output
    line = _one_error_line(_invoke("train", p))
    assert "at least 2" in line and "min_confidence" in line
    assert (out / "train" / "config.json").read_bytes() == student_cfg
    assert not [x.name for x in out.iterdir() if ".tmp" in x.name]
    assert calls.answered == 24 + 9  # nothing relabelled along the way


def test_long_error_is_not_wrapped(tmp_path):
    """Output piped to a log must keep one error on one line (rich wraps at 80 columns by default)."""
    deep = tmp_path / ("a-rather-long-folder-name-" * 3) / "task"
    p = write_task(deep, overrides={"teacher": {"temprature": 0.3}})
    line = _one_error_line(_invoke("generate", p))
    assert str(p) in line


def test_curate_error_on_a_real_train_file(tmp_path, monkeypatch):
    """Errors in data read by a later stage (data.train, read by curate) are one line too."""
    install_tiny_models(monkeypatch)
    p = write_task(tmp_path / "t", n_inputs=12, n_gold=6, overrides={"data": {"train": "real.csv"}})
    (tmp_path / "t" / "real.csv").write_text("text,label\nfine,red\nbad one,ultraviolet\n", encoding="utf-8")
    assert _invoke("generate", p).exit_code == 0
    line = _one_error_line(_invoke("curate", p))
    assert "real.csv" in line and "row 2" in line and "'ultraviolet'" in line
    assert not (tmp_path / "runs" / "tiny-colors" / "curate").exists()


def test_task_with_openai_backend_needs_no_key_to_fail_early(tmp_path, monkeypatch):
    """A task error is reported before any teacher (or network client) is created."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    p = write_task(tmp_path / "t", overrides=deep_merge({}, {"teacher": {"backend": "openai", "model": "gpt-4o-mini",
                                                                         "gguf_file": None, "bogus": 1}}))
    line = _one_error_line(_invoke("generate", p))
    assert "teacher.bogus" in line


def test_error_text_is_not_read_as_markup(tmp_path):
    """A folder called [v2] (or a message quoting "[a, b]") must come out verbatim, not as a rich tag."""
    p = write_task(tmp_path / "[v2]" / "task", overrides={"teacher": {"temprature": 0.3}})
    line = _one_error_line(_invoke("generate", p))
    assert f"{p}:" in line and "[v2]" in line

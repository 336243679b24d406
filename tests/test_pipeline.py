"""End to end: ``protege.pipeline.run`` on a tiny task with a tiny random teacher and a static student.

The teacher is the real HFTeacher code on a 2-layer random Llama (``install_tiny_models``), counting
every batch it is asked to label; the static student's distilled table is swapped for a small random
one so no encoder is distilled here.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import pytest

from protege.data import read_jsonl
from protege.teachers.ledger import Ledger
from protege.pipeline import run
from protege.task import load_task
from tiny import install_tiny_models, write_task

STAGES = ("generate", "curate", "train")
N_INPUTS, N_GOLD = 36, 15


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: extra threads only spin


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One full run, shared by the read-only checks below."""
    root = tmp_path_factory.mktemp("pipe")
    with pytest.MonkeyPatch.context() as mp:
        calls = install_tiny_models(mp)
        task_file = write_task(root / "task", n_inputs=N_INPUTS, n_gold=N_GOLD)
        out = root / "out"
        report = run(load_task(task_file), out).report.to_dict()
    return {"report": report, "out": out, "task_file": task_file, "calls": calls}


def _mtimes(out: Path) -> dict[str, int]:
    return {s: (out / s / "config.json").stat().st_mtime_ns for s in STAGES}


def _ledger_rows(out: Path) -> int:
    with Ledger(out / "ledger.sqlite") as led:
        return led.count()


def _strict_json(path: Path) -> dict:
    def no_nan(x):
        raise ValueError(f"{path} holds {x}: not valid JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=no_nan)


# -- the report ------------------------------------------------------------------------------------

def test_report_json_has_the_contract_keys_with_sane_values(first_run):
    out = first_run["out"]
    r = _strict_json(out / "report.json")
    assert r["task"] == "tiny-colors" and r["kind"] == "classify" and r["metric"] == "accuracy"
    assert r["n_eval"] == N_GOLD
    for who in ("teacher", "student"):
        d = r[who]
        assert isinstance(d["name"], str) and d["name"]
        assert 0.0 <= d["score"] <= 1.0
        lo, hi = d["score_ci"]
        assert 0.0 <= lo <= d["score"] <= hi <= 1.0
        assert d["ms_per_item"] > 0 and math.isfinite(d["ms_per_item"])
        assert d["usd_per_1k"] >= 0 and math.isfinite(d["usd_per_1k"])
        # the score is a fraction of the gold items
        assert abs(d["score"] * N_GOLD - round(d["score"] * N_GOLD)) < 1e-9
    s, t = r["student"], r["teacher"]
    assert 0.0 <= s["agreement"] <= 1.0
    assert isinstance(s["params"], int) and s["params"] > 0
    assert t["score"] > 0  # balanced gold: a teacher scoring 0 would make `retained` meaningless
    assert r["retained"] == pytest.approx(s["score"] / t["score"])
    assert r["speedup"] == pytest.approx(t["ms_per_item"] / s["ms_per_item"])
    assert r["speedup"] > 1  # a numpy student beats a transformer forward pass, even a tiny one
    # the teacher's $ are its measured time at its hourly price
    assert t["usd_per_1k"] == pytest.approx(t["ms_per_item"] / 1000 * 0.5 / 3600 * 1000, rel=1e-6)


def test_report_agrees_with_the_artifacts(first_run):
    """Recompute the teacher's score and the student's agreement from the stage outputs."""
    out, r = first_run["out"], _strict_json(first_run["out"] / "report.json")
    task = load_task(first_run["task_file"])
    gold = read_jsonl(task.path(task.data.gold))
    teacher = {row["id"]: row for row in read_jsonl(out / "generate" / "gold.jsonl")}
    from protege.data import text_key
    from protege.students.classifier import StaticClassifier

    t_pred = [teacher[text_key(g["text"])]["label"] for g in gold]
    assert r["teacher"]["score"] == pytest.approx(sum(p == g["label"] for p, g in zip(t_pred, gold)) / len(gold))
    student = StaticClassifier.from_pretrained(out / "train" / "student")
    s_pred = student.predict([g["text"] for g in gold])
    assert r["student"]["score"] == pytest.approx(sum(p == g["label"] for p, g in zip(s_pred, gold)) / len(gold))
    assert r["student"]["agreement"] == pytest.approx(sum(a == b for a, b in zip(s_pred, t_pred)) / len(gold))


def test_report_html_embeds_png_plots(first_run):
    html = (first_run["out"] / "report.html").read_text(encoding="utf-8")
    assert html.lstrip().lower().startswith("<!doctype html>")
    assert "tiny-colors" in html
    uris = html.split('src="data:image/png;base64,')[1:]
    assert len(uris) >= 2
    png = base64.b64decode(uris[0].split('"', 1)[0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert "http://" not in html and "https://" not in html  # self-contained: nothing fetched when opened


def test_artifacts_are_complete_and_nothing_half_written(first_run):
    out, calls = first_run["out"], first_run["calls"]
    for s in STAGES:
        cfg = json.loads((out / s / "config.json").read_text())
        assert cfg["stage"] == s and cfg["fingerprint"]
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name or ".old" in p.name]
    assert (out / "train" / "student" / "model.safetensors").is_file()
    # every input and every gold input was labelled exactly once, through the ledger
    assert calls.built == 1
    assert calls.answered == N_INPUTS + N_GOLD
    assert _ledger_rows(out) == N_INPUTS + N_GOLD
    with Ledger(out / "ledger.sqlite") as led:
        stages = dict(led.db.execute("SELECT stage, count(*) FROM calls GROUP BY stage").fetchall())
    assert stages == {"generate": N_INPUTS, "gold": N_GOLD}
    # gold labels never reach the training data
    gold_texts = {g["text"] for g in read_jsonl(first_run["task_file"].parent / "gold.jsonl")}
    assert not gold_texts & {r["text"] for r in read_jsonl(out / "curate" / "train.jsonl")}


# -- caching ---------------------------------------------------------------------------------------

@pytest.fixture
def fresh_run(tmp_path, monkeypatch):
    calls = install_tiny_models(monkeypatch)
    task_file = write_task(tmp_path / "task", n_inputs=N_INPUTS, n_gold=N_GOLD)
    out = tmp_path / "out"
    report = run(load_task(task_file), out).report.to_dict()
    return {"report": report, "out": out, "task_file": task_file, "calls": calls}


def test_second_run_makes_no_teacher_calls_and_skips_stages(fresh_run):
    out, calls, task_file = fresh_run["out"], fresh_run["calls"], fresh_run["task_file"]
    before_calls, before_rows, before_mtimes = calls.answered, _ledger_rows(out), _mtimes(out)
    first = fresh_run["report"]
    report = run(load_task(task_file), out).report.to_dict()
    assert calls.answered == before_calls and calls.built == 1  # the teacher is not even loaded
    assert _ledger_rows(out) == before_rows
    assert _mtimes(out) == before_mtimes
    for who in ("teacher", "student"):
        assert report[who]["score"] == first[who]["score"]
    assert report["student"]["agreement"] == first["student"]["agreement"]


def test_changing_min_confidence_reruns_curate_and_train_only(fresh_run):
    out, calls, task_file = fresh_run["out"], fresh_run["calls"], fresh_run["task_file"]
    conf = sorted(r["confidence"] for r in read_jsonl(out / "generate" / "train.jsonl"))
    threshold = conf[len(conf) // 2]  # keeps about half
    assert conf[0] < threshold, "the tiny teacher should not be equally sure of everything"
    before_calls, before_rows, before_mtimes = calls.answered, _ledger_rows(out), _mtimes(out)
    n_before = len(read_jsonl(out / "curate" / "train.jsonl"))

    text = task_file.read_text().replace("min_confidence: 0.0", f"min_confidence: {threshold}")
    assert text != task_file.read_text()
    task_file.write_text(text)
    run(load_task(task_file), out)

    after = _mtimes(out)
    assert after["generate"] == before_mtimes["generate"]
    assert after["curate"] != before_mtimes["curate"] and after["train"] != before_mtimes["train"]
    assert calls.answered == before_calls and calls.built == 1 and _ledger_rows(out) == before_rows
    kept = read_jsonl(out / "curate" / "train.jsonl")
    assert 2 <= len(kept) < n_before
    assert all(r["confidence"] >= threshold for r in kept)


def test_force_relabels_from_the_ledger_without_new_calls(fresh_run):
    out, calls, task_file = fresh_run["out"], fresh_run["calls"], fresh_run["task_file"]
    before_calls, before_mtimes = calls.answered, _mtimes(out)
    run(load_task(task_file), out, force=True)
    assert _mtimes(out)["generate"] != before_mtimes["generate"]  # the stage re-ran...
    assert calls.answered == before_calls  # ...but every answer came from the ledger


def test_changing_the_instruction_relabels(fresh_run):
    out, calls, task_file = fresh_run["out"], fresh_run["calls"], fresh_run["task_file"]
    before = calls.answered
    task_file.write_text(task_file.read_text().replace("Say which colour", "Tell which colour"))
    run(load_task(task_file), out)
    assert calls.answered == before + N_INPUTS + N_GOLD  # a new prompt is a new request
    assert _ledger_rows(out) == 2 * (N_INPUTS + N_GOLD)


# -- crashes ---------------------------------------------------------------------------------------

def test_crash_mid_generate_leaves_no_artifact_and_resumes_without_repeating_calls(tmp_path, monkeypatch):
    from protege.stages.generate import generate

    calls = install_tiny_models(monkeypatch)
    task_file = write_task(tmp_path / "task", n_inputs=N_INPUTS, n_gold=N_GOLD)  # batch_size 8
    out = tmp_path / "out"
    calls.fail_after = 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate(load_task(task_file), out)
    assert not (out / "generate").exists()
    assert {p.name for p in out.iterdir()} <= {"ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm"}
    assert _ledger_rows(out) == 16  # the two finished batches were committed one by one
    done = list(calls.texts)

    calls.fail_after = None
    generate(load_task(task_file), out)
    assert calls.answered == N_INPUTS + N_GOLD  # 16 before the crash + the rest, nothing twice
    resent = calls.texts[len(done):]
    assert not {tuple(x) for x in done} & {tuple(x) for x in resent}
    assert (out / "generate" / "config.json").is_file()
    assert len(read_jsonl(out / "generate" / "train.jsonl")) == N_INPUTS


def test_stage_writer_keeps_the_old_artifact_when_a_stage_fails(tmp_path):
    from protege.artifacts import is_fresh, stage_writer

    d = tmp_path / "curate"
    with stage_writer(d, {"stage": "curate", "fingerprint": "a"}) as tmp:
        (tmp / "train.jsonl").write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        with stage_writer(d, {"stage": "curate", "fingerprint": "b"}) as tmp:
            (tmp / "train.jsonl").write_text("half")
            raise KeyboardInterrupt
    assert (d / "train.jsonl").read_text() == "old\n" and is_fresh(d, "a") and not is_fresh(d, "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curate"]


def test_stages_need_their_upstream(tmp_path, monkeypatch):
    from protege.stages.curate import curate
    from protege.stages.evaluate import evaluate
    from protege.stages.train import train

    install_tiny_models(monkeypatch)
    task = load_task(write_task(tmp_path / "task"))
    for fn, need in ((curate, "generate"), (train, "curate"), (evaluate, "train")):
        with pytest.raises(FileNotFoundError, match=f"run `protege {need}` first"):
            fn(task, tmp_path / "out")

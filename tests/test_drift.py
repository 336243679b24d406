"""Drift figures (PSI, Wilson, centroid distance, the verdict), ``protege drift``, and ``protege redistill``.

The redistill test runs the real pipeline with the tiny random teacher of ``tiny.install_tiny_models``
(counting every item it labels): the gateway escalates new inputs to it through the ledger, and the
new round then labels those same inputs with **no** new teacher call.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from protege.serve.drift import DriftMonitor, Reference, assess, cosine_distance, psi, snapshot, unit_mean, wilson
from tiny import install_tiny_models, synthetic_rows, write_task


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: extra threads only spin


# -- the figures ------------------------------------------------------------------------------------

def test_psi_matches_its_definition_on_hand_made_bins():
    ref = np.repeat([0.1, 0.3, 0.5, 0.7, 0.9], 20)  # quintiles; with bins=5 each bin holds one value
    live = np.array([0.1] * 40 + [0.3] * 30 + [0.5] * 10 + [0.7] * 10 + [0.9] * 10)
    p = np.full(5, 0.2)
    q = np.array([0.4, 0.3, 0.1, 0.1, 0.1])
    assert psi(ref, live, bins=5) == pytest.approx(float(np.sum((q - p) * np.log(q / p))), rel=1e-9)
    assert psi(ref, ref, bins=5) == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(0)
    a = rng.beta(8, 2, 5000)
    assert psi(a, rng.beta(8, 2, 5000)) < 0.02  # same population
    assert psi(a, rng.beta(2, 2, 5000)) > 0.25  # a different one
    assert math.isnan(psi([], [0.5]))


def test_wilson_interval():
    lo, hi = wilson(45, 50)
    assert lo == pytest.approx(0.7864, abs=1e-3) and hi == pytest.approx(0.9565, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0


def test_centroid_distance_and_monitor_window():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(200, 8)) + 3.0
    ref = Reference(rng.uniform(0.6, 1.0, 500), unit_mean(base), agreement=0.9)
    assert cosine_distance(ref.centroid, unit_mean(base[::-1])) == pytest.approx(0.0, abs=1e-12)
    mon = DriftMonitor(ref, window=200)
    for i in range(400):  # the window keeps the last 200: the shifted half
        shifted = i >= 200
        mon.observe(0.3 if shifted else 0.9, -base[i % 200] if shifted else base[i % 200])
    for _ in range(40):
        mon.observe_shadow(False)
    snap = mon.snapshot()
    assert snap["n"] == 200 and snap["mean_confidence"] == pytest.approx(0.3)
    assert snap["centroid_distance"] == pytest.approx(2.0, abs=1e-6)  # the opposite direction
    assert snap["agreement"] == 0.0 and snap["shadow_n"] == 40
    v = assess(snap)
    assert v["status"] == "re-distill" and len(v["reasons"]) == 3


def test_assess_says_ok_watch_and_not_enough():
    ref = Reference(np.linspace(0.5, 1.0, 1000), None, agreement=0.9)
    ok = snapshot(ref, np.linspace(0.5, 1.0, 200), [1] * 45 + [0] * 5)
    assert assess(ok)["status"] == "ok", assess(ok)
    few = snapshot(ref, np.linspace(0.5, 1.0, 20), [1] * 3)
    assert assess(few)["status"] == "not enough traffic"
    lower = snapshot(ref, np.linspace(0.5, 1.0, 200), [1] * 50 + [0] * 14)  # 78%, CI below 90%, drop > 5 points
    assert assess(lower)["status"] == "re-distill"
    watch = snapshot(ref, np.linspace(0.5, 1.0, 200), [1] * 170 + [0] * 30)  # 85%: CI upper < 90%, drop = 5 points
    assert assess(watch)["status"] == "watch"
    assert json.loads(json.dumps(ok)) == ok  # JSON-able, no NaN


# -- drift through the engine and the CLI, then redistill ---------------------------------------------------

@pytest.fixture(scope="module")
def served_run(tmp_path_factory):
    """A real tiny run (pipeline with the tiny teacher), its task file and the teacher's call counter."""
    from protege.pipeline import run
    from protege.task import load_task

    root = tmp_path_factory.mktemp("drift")
    mp = pytest.MonkeyPatch()
    calls = install_tiny_models(mp)
    task_file = write_task(root / "task", n_inputs=36, n_gold=15)
    out = root / "run"
    report = run(load_task(task_file), out).report.to_dict()
    yield {"task_file": task_file, "out": out, "calls": calls, "report": report, "mp": mp}
    mp.undo()


def _engine(served_run, **serve):
    from protege.serve.cascade import Engine, GatewayConfig
    from protege.task import load_task

    task = load_task(served_run["task_file"])
    return Engine(GatewayConfig(task, served_run["out"], serve=task.serve.model_copy(update=serve)))


def test_protege_drift_flags_unfamiliar_traffic(served_run):
    from protege.cli import app

    eng = _engine(served_run, escalate="none", shadow_fraction=0.0)
    try:
        assert eng.reference is not None and len(eng.reference.confidences) == 15  # the held-out gold inputs
        assert eng.reference.centroid is not None
        eng.answer_many([f"zq{i} xv{i * 7} kkjh{i % 5} ploo" for i in range(150)], "classify")
    finally:
        eng.close()
    r = CliRunner().invoke(app, ["drift", str(served_run["task_file"]), "--out", str(served_run["out"])],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "re-distill" in r.output and "centroid moved" in r.output and "protege redistill" in r.output


def test_redistill_folds_escalated_traffic_in_at_no_new_teacher_cost(served_run):
    from protege.serve.redistill import better, redistill
    from protege.task import load_task

    calls = served_run["calls"]
    new_texts = [r["text"] for r in synthetic_rows(9, start=2000)]
    eng = _engine(served_run, threshold=1.0, escalate="teacher")  # every input escalates
    try:
        outs = eng.answer_many(new_texts, "classify")
        assert {o.answered_by for o in outs} <= {"teacher", "student-fallback"}
        assert sum(o.answered_by == "teacher" for o in outs) >= 1
    finally:
        eng.close()
    answered = calls.answered
    old_report = json.loads((served_run["out"] / "report.json").read_text())
    r = redistill(load_task(served_run["task_file"]), served_run["out"])
    assert calls.answered == answered  # every input of the new round was answered from the ledger
    assert r["counts"]["teacher_answered"] == sum(o.answered_by == "teacher" for o in outs)
    derived = load_task(r["task_file"])
    inputs = [json.loads(x)["text"] for x in open(derived.path(derived.data.inputs))]
    assert set(new_texts) <= set(inputs) and len(inputs) == 36 + 9
    cand = json.loads(((served_run["out"] if r["promoted"] else Path(r["candidate"])) / "report.json").read_text())
    assert cand["student"]["score"] == r["new_score"] and r["old_score"] == old_report["student"]["score"]
    assert r["promoted"] == better(cand, old_report)[0] == (r["new_score"] > r["old_score"])
    if not r["promoted"]:  # the run is untouched
        assert json.loads((served_run["out"] / "report.json").read_text()) == old_report


def test_promotion_rule():
    from protege.serve.redistill import better

    old = {"n_eval": 100, "metric": "accuracy", "student": {"score": 0.80}}
    assert better({**old, "student": {"score": 0.81}}, old)[0]
    assert not better({**old, "student": {"score": 0.80}}, old)[0]
    assert not better({**old, "student": {"score": 0.81}}, old, min_gain=0.02)[0]
    assert not better({**old, "n_eval": 90, "student": {"score": 0.99}}, old)[0]  # different gold: not comparable
    assert better(old, None)[0]

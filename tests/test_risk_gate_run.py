"""The risk gate on a real run (``student.kind: auto``, tiny models): report.json states the promise and what it
delivers on gold, the non-chosen rungs are calibrated on their own out-of-fold probabilities, the gateway chains
them, and ``protege drift`` re-checks the promise on shadow traffic."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from test_ladder import fake_encoder  # noqa: F401 - the fixture
from tiny import install_tiny_models, write_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def auto_run(fake_encoder, tmp_path, monkeypatch):  # noqa: F811
    from protege.pipeline import run
    from protege.task import load_task

    install_tiny_models(monkeypatch)
    task_file = write_task(tmp_path / "task", n_inputs=48, n_gold=15, overrides={
        "student": {"kind": "auto", "cv_folds": 3, "max_ms": 50.0, "rungs": ["static", "frozen"]},
        "serve": {"risk": 0.2, "delta": 0.2}})
    task = load_task(task_file)
    out = tmp_path / "out"
    run(task, out)
    return task, task_file, out


def test_report_states_the_promise_levels_calibrate_and_drift_rechecks(auto_run):
    from protege.serve.gates import calibrate_rung, load_calibration
    from protege.serve.cascade import Engine, GatewayConfig

    task, task_file, out = auto_run
    report = json.loads((out / "report.json").read_text())
    rg = report["cascade"]["risk_gate"]
    n_rows = len((out / "curate" / "train.jsonl").read_text().splitlines())
    assert rg["risk"] == 0.2 and rg["delta"] == 0.2 and rg["n_cal"] == n_rows
    assert rg["calibration"].startswith("train/calibration.npz")
    items = [json.loads(x) for x in (out / "evaluate" / "items.jsonl").read_text().splitlines()]
    conf = np.array([it["student_confidence"] for it in items])
    thr = np.inf if rg["threshold"] is None else rg["threshold"]
    answered = conf >= thr
    assert rg["gold"]["n"] == 15 and rg["gold"]["n_answered"] == int(answered.sum())
    if answered.any():  # disagreement with the teacher among answered gold items, recomputed from items.jsonl
        dis = [it["student"] != it["teacher"] for it, a in zip(items, answered) if a]
        assert rg["gold"]["risk"] == pytest.approx(np.mean(dis))
        assert rg["gold"]["held"] == (np.mean(dis) <= 0.2)

    chosen = json.loads((out / "train" / "stats.json").read_text())["ladder"]["chosen"]
    other = "frozen" if chosen == "static" else "static"
    # the ladder's folds and settings, recomputed: the chosen rung's out-of-fold answers come back the same
    calibrate_rung(task, out, chosen)
    P0, _, _ = load_calibration(out)
    P1 = np.load(out / "calibrate" / f"{chosen}.npz")["probs"]
    seen = np.isfinite(P0).all(1)
    assert (P0[seen].argmax(1) == P1[seen].argmax(1)).all()
    # the train stage saved every other rung's out-of-fold probabilities too: a cascade level needs no re-run of
    # its CV, and what it saved is what re-running the CV gives
    saved, _, src = load_calibration(out, other)
    assert src == f"train/calibration/{other}.npz (out-of-fold)" and saved.shape == (n_rows, 3)
    calibrate_rung(task, out, other)
    again = np.load(out / "calibrate" / f"{other}.npz")["probs"]
    seen = np.isfinite(saved).all(1)
    # (equal up to the optimiser: the ladder warm-started this fit along its C path, the re-run starts cold)
    assert seen.any() and np.allclose(saved[seen], again[seen], atol=5e-3)
    # a level whose calibration set is missing is calibrated when the gateway starts
    (out / "train" / "calibration" / f"{other}.npz").unlink()
    (out / "calibrate" / f"{other}.npz").unlink()
    assert load_calibration(out, other) is None
    e = Engine(GatewayConfig(task, out, serve=task.serve.model_copy(update={"levels": [chosen, other],
                                                                              "shadow_fraction": 0.0})))
    try:
        assert [lv.name for lv in e.levels] == [chosen, other]
        cal = np.load(out / "calibrate" / f"{other}.npz")
        assert cal["probs"].shape == (n_rows, 3) and str(cal["rung"]) == other
        assert e.levels[1].source.startswith(f"calibrate/{other}.npz")
    finally:
        e.close()
    check_drift(task, task_file, out)


def check_drift(task, task_file, out):
    """``protege drift`` re-checks the promise on shadow traffic (run last: it replaces the calibration set)."""
    from protege.cli import app
    from protege.serve.gates import served_threshold, shadow_risk
    from protege.serve.store import TrafficStore

    # the tiny teacher's labels cannot be learnt, so the run's own gate certifies nothing (threshold +inf); a
    # calibration set on which the student always agreed (at confidence 0.9) certifies answering everything
    cal = np.load(out / "train" / "calibration.npz")
    n = len(cal["teacher"])
    P = np.full((n, 3), 0.05, dtype=np.float32)
    P[np.arange(n), cal["teacher"]] = 0.9
    np.savez(out / "train" / "calibration.npz", probs=P, teacher=cal["teacher"], rung=cal["rung"])
    thr, source, gate = served_threshold(out, task.serve, None)
    assert gate is not None and gate.feasible and "risk gate" in source and thr <= 0.9
    store = TrafficStore(out / "serve" / "traffic.sqlite")
    for i in range(40):  # answered items; 20 disagree with the teacher: 50% > the promised 20%
        store.add("shadow", text=f"x{i}", student_label="red", student_confidence=0.95,
                  teacher_label="red" if i % 2 else "blue", teacher_probs=None, agree=i % 2)
    store.add("shadow", text="low", student_label="red", student_confidence=-1.0, teacher_label="blue",
              teacher_probs=None, agree=0)  # below the threshold: not an answered item, not counted
    store.add("requests", endpoint="chat", mode="cascade", answered_by="student", label="red", confidence=0.9,
              threshold=thr, student_label="red", teacher_label=None, teacher_probs=None, teacher_soft=None,
              teacher_usd=0.0, review_id=None, latency_ms=1.0, text=None)
    store.flush()
    r = shadow_risk(store, thr, 0.2)
    store.close()
    assert r["n"] == 40 and r["disagreements"] == 20 and r["status"] == "broken" and r["risk_ci"][0] > 0.2
    res = CliRunner().invoke(app, ["drift", str(task_file), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "disagreement on answered items" in res.output and "broken" in res.output

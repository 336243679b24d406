"""Drift on a real tiny run: held-out in-distribution traffic says ``ok``; unfamiliar traffic says re-distill.

The PSI reference is the student's confidence on held-out (gold) inputs, not on the inputs it was trained on
(where it is more confident, so ordinary traffic always looked shifted). ``protege drift`` recomputes the
centroid distance over the stored traffic window, across gateway sessions, not from the last snapshot.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from protege.serve.drift import DriftMonitor, Reference, unit_mean, window_centroid
from tiny import install_tiny_models, synthetic_rows, write_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from protege.pipeline import run
    from protege.task import load_task

    root = tmp_path_factory.mktemp("drift-ref")
    mp = pytest.MonkeyPatch()
    install_tiny_models(mp)
    task_file = write_task(root / "task", n_inputs=60, n_gold=120, overrides={"student": {"dims": 64}})
    out = root / "run"
    run(load_task(task_file), out)
    yield task_file, out
    mp.undo()


def _serve(task_file, out, texts, **serve):
    from protege.serve.cascade import Engine, GatewayConfig
    from protege.task import load_task

    task = load_task(task_file)
    eng = Engine(GatewayConfig(task, out, serve=task.serve.model_copy(update={"escalate": "none", "shadow_fraction": 0.0,
                                                                             **serve})))
    try:
        eng.answer_many(list(texts), "classify")
        return eng.reference
    finally:
        eng.close()


def _drift(task_file, out) -> str:
    from protege.cli import app

    r = CliRunner().invoke(app, ["drift", str(task_file), "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def _verdict(task_file, out) -> tuple[str, str]:
    text = _drift(task_file, out)
    lines = [x.strip() for x in text.splitlines()]
    return next(x for x in lines if x in ("ok", "watch", "re-distill", "not enough traffic")), text


def test_held_out_traffic_has_no_confidence_shift_and_unfamiliar_traffic_does(tiny_run, tmp_path):
    import shutil

    task_file, out0 = tiny_run
    out = tmp_path / "run"
    shutil.copytree(out0, out, symlinks=True, ignore=shutil.ignore_patterns("serve"))
    # same distribution as the gold set (rows 10000-10119), never seen in training or evaluation
    ref = _serve(task_file, out, [r["text"] for r in synthetic_rows(300, start=10_120)])
    assert ref is not None and ref.source == "gold" and ref.n_texts == 120
    status, text = _verdict(task_file, out)
    assert "confidence PSI" in text and "PSI 0." not in text.split(status)[-1], text  # no PSI reason given
    _serve(task_file, out, [f"zq{i} xv{i * 7} kkjh{i % 5} ploo" for i in range(1000)])
    status, text = _verdict(task_file, out)
    assert status == "re-distill" and "confidence PSI" in text.split(status)[-1] and "centroid moved" in text, text


def test_held_out_traffic_says_ok(tiny_run, tmp_path):
    """The tiny student's embeddings are PCA-centred, so the mean of a few hundred is noisy (distance ~0.45 on
    in-distribution traffic, over the fixed 0.15): the alert is raised only past the distance this many
    in-distribution requests reach by chance, resampled from the reference's own held-out inputs."""
    import shutil

    task_file, out0 = tiny_run
    out = tmp_path / "run"
    shutil.copytree(out0, out, symlinks=True, ignore=shutil.ignore_patterns("serve"))
    _serve(task_file, out, in_distribution(300))
    status, text = _verdict(task_file, out)
    assert status == "ok", text


def in_distribution(n: int, seed: int = 0) -> list[str]:
    """New texts from the gold set's distribution: a gold row's words with another gold row's number (synthetic
    rows at other indices carry other number tokens, which a random embedding table sees as new words)."""
    rng = np.random.default_rng(seed)
    gold = [r["text"].rsplit(" ", 1) for r in synthetic_rows(120, start=10_000)]
    seen, out = {" ".join(g) for g in gold}, []
    while len(out) < n:
        a, b = (gold[i] for i in rng.integers(0, len(gold), 2))
        if (t := f"{a[0]} {b[1]}") not in seen:
            seen.add(t)
            out.append(t)
    return out


def test_drift_centroid_covers_the_stored_window_across_sessions(tmp_path):
    """Session 1 saw 300 unfamiliar inputs, session 2 five familiar ones: the window is mostly unfamiliar."""
    from protege.serve.drift import drift_report
    from protege.serve.store import TrafficStore

    rng = np.random.default_rng(0)
    home = rng.normal(size=(400, 8)) + 3.0
    ref = Reference(rng.uniform(0.6, 1.0, 200), unit_mean(home))
    store = TrafficStore(tmp_path / "traffic.sqlite")
    for rows in (-home[:300], home[300:305]):  # two gateway sessions, each with its own monitor
        mon = DriftMonitor(ref, window=1000)
        for i, e in enumerate(rows):
            mon.observe(0.8, e)
            store.add("requests", endpoint="classify", mode="cascade", answered_by="student", confidence=0.8,
                      teacher_usd=0.0, latency_ms=1.0)
            if (i + 1) % 100 == 0 or i == len(rows) - 1:  # every 100 requests and at close, as the engine does
                store.add("drift", snapshot=json.dumps(mon.snapshot()))
    store.flush()
    r = drift_report(store, ref, window=1000)
    store.close()
    assert r["n"] == 305
    assert r["centroid_distance"] > 1.5  # 300 of 305 point the other way; the last session alone gives ~0
    assert r["status"] == "re-distill" and any("centroid moved" in x for x in r["reasons"])


def test_window_centroid_adds_steps_of_each_session():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(250, 4)) + 2, rng.normal(size=(30, 4)) - 2
    snaps = []
    for session, rows in (("s1", a), ("s2", b)):
        mon = DriftMonitor(Reference([0.5], unit_mean(a)), window=1000)
        for i, e in enumerate(rows):
            mon.observe(0.5, e)
            if (i + 1) % 100 == 0 or i == len(rows) - 1:
                snaps.append(json.loads(json.dumps(mon.snapshot())))
    live, n = window_centroid(snaps, 10_000)
    assert n == 280 and np.allclose(live, unit_mean(np.vstack([a, b])))
    live, n = window_centroid(snaps, 60)  # newest steps first: session 2 (30), then a's last step (50)
    assert n == 80 and np.allclose(live, unit_mean(np.vstack([a[200:], b])))


def test_centroid_noise_grows_for_small_windows_and_spread_out_embeddings():
    from protege.serve.drift import assess, centroid_null

    rng = np.random.default_rng(1)
    tight, spread = rng.normal(size=(150, 16)) * 0.1 + 1.0, rng.normal(size=(150, 16))
    nt, ns = dict(centroid_null(tight)), dict(centroid_null(spread))
    assert ns[25] > ns[400] and ns[25] > nt[25] * 5 and nt[400] < 0.01
    ref = Reference(rng.uniform(0.6, 1.0, 150), unit_mean(spread), centroid_null=centroid_null(spread))
    noise = ref.centroid_noise(300)
    base = {"n": 300, "psi": 0.0, "shadow_n": 0, "centroid_noise": noise}
    assert assess({**base, "centroid_distance": noise * 0.9})["status"] == "ok"
    assert assess({**base, "centroid_distance": noise * 1.5 + 0.2})["status"] == "re-distill"
    assert ref.from_json(ref.to_json()).centroid_noise(300) == pytest.approx(noise, rel=1e-4)

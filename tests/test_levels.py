"""The multi-level cascade and the OOD gate over real HTTP (uvicorn on 127.0.0.1, the ``openai`` client).

Two static students form the chain: ``blind`` never learnt "blue" (its teacher rows for blue are uniform, so it is
unsure there) and ``full`` learnt all three colours. Each level's risk gate is certified on out-of-fold
probabilities computed here by 5-fold cross-fitting (the rows each fold's model never saw), as the ladder does. The
teacher is another protege gateway reached through the ``openai`` backend.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import openai
import pytest

from protege.serve.gateway import GatewayConfig, create_app
from protege.serve.local_lm import serve_in_thread
from protege.task import load_task
from tiny import minilm_tokenizer, write_task

LABELS = ["red", "green", "blue"]
CUES = {"red": ["cherry", "tomato", "ruby", "brick"], "green": ["grass", "lime", "leaf", "moss"],
        "blue": ["ocean", "sky", "sapphire", "denim"]}
FILL = ["small", "old", "shiny", "plain", "heavy", "soft", "bright", "quiet", "large", "new"]


def rows_from(start: int, n: int) -> list[dict]:
    """Distinct short rows whose colour is in one cue word; everything else is shared filler."""
    out = []
    for i in range(start, start + n):
        lab, j = LABELS[i % 3], i // 3
        out.append({"text": f"the {FILL[j % 10]} {CUES[lab][(j // 10) % 4]} is {FILL[(j // 40) % 10]}", "label": lab})
    return out
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def targets(rows, blind: bool) -> np.ndarray:
    P = np.eye(3, dtype=np.float32)[[LABELS.index(r["label"]) for r in rows]]
    if blind:
        P[[r["label"] == "blue" for r in rows]] = 1 / 3
    return P


def fit(rows, blind: bool, seed: int = 0):
    from protege.students.classifier import StaticClassifier

    tok = minilm_tokenizer()
    emb = np.random.default_rng(seed).normal(size=(tok.get_vocab_size(), 64)).astype(np.float32)
    return StaticClassifier(emb, tok, LABELS).fit([r["text"] for r in rows], targets(rows, blind), seed=seed,
                                                  dense_weight=1.0)


def out_of_fold(rows, blind: bool, k: int = 5) -> np.ndarray:
    P = np.zeros((len(rows), 3), dtype=np.float32)
    folds = np.arange(len(rows)) % k
    for f in range(k):
        tr = [r for r, g in zip(rows, folds) if g != f]
        P[folds == f] = fit(tr, blind).predict_proba([r["text"] for r, g in zip(rows, folds) if g == f])
    return P


class Served:
    def __init__(self, app):
        self.app, self.engine = app, app.state.engine
        self.url, self._stop = serve_in_thread(app)

    def stop(self):
        self._stop()
        self.engine.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("levels")
    rows = rows_from(0, 300)
    t_task = load_task(write_task(root / "teacher-task"))
    fit(rows, blind=False, seed=1).save_pretrained(root / "teacher-run" / "train" / "student")
    teacher = Served(create_app(GatewayConfig(t_task, root / "teacher-run", serve=t_task.serve.model_copy(
        update={"escalate": "none", "shadow_fraction": 0.0, "rate_limit_per_minute": None}), api_keys=[])))
    task = load_task(write_task(root / "task", overrides={"teacher": {
        "backend": "openai", "model": "protege-teacher", "base_url": teacher.url, "api_key_env": None,
        "gguf_file": None, "price_in_per_1m": 1.0, "price_out_per_1m": 2.0, "top_logprobs": 3, "max_tokens": 4}}))
    run = root / "run"
    (run / "curate").mkdir(parents=True)
    (run / "curate" / "train.jsonl").write_text("".join(json.dumps({**r, "probs": p.tolist()}) + "\n"
                                                        for r, p in zip(rows, targets(rows, False))))
    teacher_idx = np.array([LABELS.index(r["label"]) for r in rows])
    for name, blind in (("blind", True), ("full", False)):
        fit(rows, blind).save_pretrained(run / "train" / "ladder" / name)
    fit(rows, True).save_pretrained(run / "train" / "student")  # the ladder's chosen rung: blind
    np.savez(run / "train" / "calibration.npz", probs=out_of_fold(rows, True), teacher=teacher_idx, rung="blind")
    (run / "calibrate").mkdir()
    np.savez(run / "calibrate" / "full.npz", probs=out_of_fold(rows, False), teacher=teacher_idx, rung="full")
    yield {"task": task, "run": run, "root": root, "teacher": teacher}
    teacher.stop()


def gateway(world, data_dir: str, **serve) -> Served:
    task = world["task"]
    s = task.serve.model_copy(update={"shadow_fraction": 0.0, "rate_limit_per_minute": None, "risk": 0.05,
                                      "delta": 0.1, **serve})
    return Served(create_app(GatewayConfig(task, world["run"], serve=s, api_keys=[], data_dir=world["root"] / data_dir)))


def ask(g: Served, text: str):
    c = openai.OpenAI(base_url=g.url, api_key="unused", max_retries=0, timeout=30)
    r = c.chat.completions.create(model="x", messages=[{"role": "user", "content": text}])
    return r.choices[0].message.content, r.model_extra["protege"]


RED, BLUE = rows_from(900, 1)[0]["text"], rows_from(902, 1)[0]["text"]  # unseen combinations
ODD = "sapphire sapphire ocean denim sky sapphire ocean"  # a blue cue, but nothing like the training inputs


def test_each_level_has_its_own_certified_gate_and_answers_what_it_is_sure_of(world):
    g = gateway(world, "serve-levels", levels=["blind", "full"])
    try:
        e = g.engine
        assert [lv.name for lv in e.levels] == ["blind", "full"]
        assert all(lv.gate is not None and lv.gate.feasible and lv.gate.risk == 0.05 for lv in e.levels)
        assert e.levels[0].source.startswith("train/calibration.npz") and e.levels[1].source.startswith("calibrate/")
        assert e.threshold == e.levels[0].threshold and "train/calibration.npz" in e.threshold_source
        label, info = ask(g, RED)
        assert (label, info["level"], info["answered_by"]) == ("red", "blind", "student")
        label, info = ask(g, BLUE)  # blind is unsure: the next level answers
        assert (label, info["level"], info["answered_by"]) == ("blue", "full", "student")
        assert info["threshold"] == pytest.approx(e.levels[1].threshold)
        metrics = httpx.get(g.url.replace("/v1", "") + "/metrics").text
        assert 'protege_answers_by_level_total{level="blind"} 1.0' in metrics
        assert 'protege_answers_by_level_total{level="full"} 1.0' in metrics
    finally:
        g.stop()


def test_without_levels_blue_goes_to_the_teacher(world):
    g = gateway(world, "serve-one")
    try:
        assert g.engine.levels == [] and g.engine.risk_gate is not None and g.engine.risk_gate.feasible
        label, info = ask(g, BLUE)
        assert info["level"] == "teacher" and info["answered_by"] == "teacher" and label == "blue"
    finally:
        g.stop()


def test_ood_gate_escalates_an_unfamiliar_input_the_students_are_sure_of(world):
    off = gateway(world, "serve-ood-off", levels=["blind", "full"])
    try:
        _, info = ask(off, ODD)
        # confident: without the OOD gate a student level answers an input unlike any it was trained on
        assert info["answered_by"] == "student" and info["level"] in ("blind", "full")
    finally:
        off.stop()
    g = gateway(world, "serve-ood", levels=["blind", "full"], ood_alpha=0.02)
    try:
        ood = g.engine.levels[1].ood
        assert g.engine.ood is g.engine.levels[0].ood and ood is not None and ood.n_calibration == 60 and len(ood.reference) == 300
        label, info = ask(g, ODD)
        assert info["level"] == "teacher" and label == "blue"
        _, info = ask(g, BLUE)  # familiar inputs still pass
        assert info["level"] == "full" and info["ood_distance"] <= ood.threshold
        metrics = httpx.get(g.url.replace("/v1", "") + "/metrics").text
        assert 'protege_answers_by_level_total{level="teacher"} 1.0' in metrics
    finally:
        g.stop()

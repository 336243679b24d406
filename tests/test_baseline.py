"""``protege baseline`` end to end: a tiny local HF teacher and a small model behind a real loopback
OpenAI-compatible server (and the other way round), then the numbers recomputed from what was answered.

The served model is a real (tiny) LlamaForCausalLM whose output layer is wired so that its greedy answer
is always one of the label words, chosen by the sign of one hidden unit — so its answers depend on the
input and parse as labels, and the test checks arithmetic on real, non-trivial answers.
"""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
import torch

from protege.stages.baseline import baseline, consistency, prompt_variants, remap, student_latency, verdict
from protege.data import read_jsonl
from protege.serve.local_lm import create_lm_app, serve_in_thread
from protege.task import BaselineConfig, load_task
from protege.teachers.base import Answer
from tiny import LABELS, smollm2_tokenizer, tiny_llama, write_task

N = 8
EXAMPLES = [{"input": "a ripe cherry", "output": "red"}, {"input": "wet grass", "output": "green"}]


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def label_speaking_model(tok, seed: int = 1):
    """A tiny random Llama whose greedy next token is always ' red', ' green' or ' blue'."""
    m = tiny_llama(len(tok), seed=seed)
    with torch.no_grad():
        m.model.norm.weight.zero_()
        m.model.norm.weight[0] = 1.0  # the output layer sees one hidden unit, h0 (never exactly 0)
        m.lm_head.weight.zero_()      # every other token: logit 0
        for lab, a in zip(LABELS, (30.0, -30.0, 12.0)):  # h0 > 0 → red, h0 < 0 → green; blue gets mass
            m.lm_head.weight[tok(" " + lab, add_special_tokens=False).input_ids[0], 0] = a
    return m.eval()


@pytest.fixture(scope="module")
def server(tok):
    app = create_lm_app(label_speaking_model(tok), tok, "tiny-colour")
    url, stop = serve_in_thread(app)
    yield app, url
    stop()


@pytest.fixture(scope="module")
def local_dir(tok, tmp_path_factory):
    """A tiny random teacher saved as a local HF folder, loaded through from_pretrained like a user's."""
    d = tmp_path_factory.mktemp("tiny-teacher")
    tiny_llama(len(tok), seed=3).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def _api(url: str, **kw) -> dict:
    return {"backend": "openai", "model": "tiny-colour", "base_url": url, "api_key_env": None, "max_tokens": 2,
            "top_logprobs": 5, "price_in_per_1m": 100.0, "price_out_per_1m": 400.0, "answer_prefix": "", **kw}


def _local(path: str) -> dict:
    return {"backend": "hf", "model": path, "gguf_file": None, "usd_per_hour": 0.5, "answer_prefix": "Colour:",
            "max_input_tokens": 32, "batch_size": 8}


def _ledger(out, stage):
    with sqlite3.connect(out / "ledger.sqlite") as db:
        return db.execute("SELECT count(*), avg(tokens_in), avg(tokens_out) FROM calls WHERE stage=? AND status='ok'",
                          (stage,)).fetchone()


def _check_scores(r: dict, items: list[dict]) -> None:
    gold = [it["gold"] for it in items]
    t = [it["teacher"] for it in items]
    assert r["n"] == N == len(items)
    assert r["teacher"]["score"] == pytest.approx(np.mean([a == b for a, b in zip(t, gold)]))
    lo, hi = r["teacher"]["score_ci"]
    assert lo <= r["teacher"]["score"] <= hi
    if "small" in items[0]:
        s = [it["small"] for it in items]
        assert r["small_model"]["score"] == pytest.approx(np.mean([a == b for a, b in zip(s, gold)]))
        assert r["small_model"]["agreement_with_teacher"] == pytest.approx(np.mean([a == b for a, b in zip(s, t)]))
    same = [all(v == it["teacher"] for v in [*it["samples"], *it["variants"].values()]) for it in items]
    assert r["consistency"]["consistent"] == pytest.approx(np.mean(same))
    c = r["cost"]
    assert c["teacher_usd_per_month"] == pytest.approx(c["teacher_usd_per_call"] * c["volume_per_month"])
    assert c["one_off_usd"] == pytest.approx(c["labelling_usd"] + c["training_usd"] + c["engineering_usd"])
    saving = (c["teacher_usd_per_call"] - c["student_usd_per_call"]) * c["volume_per_month"]
    assert c["monthly_saving"] == pytest.approx(saving)
    if saving > 0:
        assert c["break_even_months"] == pytest.approx(c["one_off_usd"] / saving)
    assert r["verdict"]["decision"] and r["verdict"]["reasons"]


def test_baseline_local_teacher_and_loopback_small_model(tmp_path, server, local_dir):
    app, url = server
    p = write_task(tmp_path / "task", n_inputs=12, n_gold=10, overrides={
        "examples": EXAMPLES, "teacher": _local(local_dir), "volume_per_month": 50_000,
        "baseline": {"n": N, "small_model": _api(url), "student_ms_per_item": 0.5,
                     "instructions": ["Which colour is this text about?"]}})
    task, out = load_task(p), tmp_path / "run"
    calls0 = app.state.calls
    r = baseline(task, out)
    items = read_jsonl(out / "baseline" / "items.jsonl")
    assert json.loads((out / "baseline" / "baseline.json").read_text())["verdict"] == r["verdict"]
    _check_scores(r, items)
    # the small model answered over HTTP, once per item, every answer a label, through the ledger
    assert app.state.calls - calls0 == N
    assert r["small_model"]["invalid_answers"] == 0 and set(r["small_model"]["predicted_labels"]) <= set(LABELS)
    n_small, tin, tout = _ledger(out, "baseline-small")
    assert n_small == N
    assert r["small_model"]["usd_per_1k"] / 1000 == pytest.approx(tin * 100 / 1e6 + tout * 400 / 1e6)
    # local teacher: deterministic, so only prompt variants are compared; priced by wall time
    assert r["consistency"]["repeated_samples"] == 1
    assert set(r["variants"]) == {"examples reversed", "labels reversed", "instruction 1"}
    assert r["teacher"]["usd_per_1k"] == pytest.approx(r["teacher"]["ms_per_item"] / 1000 * 0.5 / 3600 * 1000)
    # one-off: 12 inputs to label × the teacher's batched $ per call + 0.25 h of training at $0.10/h
    assert r["cost"]["n_inputs_to_label"] == 12 and r["cost"]["training_usd"] == pytest.approx(0.025)
    assert r["student"]["ms_per_item"] == 0.5
    page = (out / "baseline" / "baseline.html").read_text()
    assert "Verdict" in page and "Side by side" in page and "data:image/png;base64," in page and "tiny-colour" in page

    # again: every answer comes from the ledger — no HTTP call, same numbers
    calls1 = app.state.calls
    r2 = baseline(task, out)
    assert app.state.calls == calls1
    assert r2["small_model"]["ledger"]["calls"] == 0 and r2["small_model"]["ledger"]["cache_hits"] == N
    assert r2["teacher"]["ledger"]["calls"] == 0
    assert r2["small_model"]["score"] == r["small_model"]["score"] and r2["teacher"]["score"] == r["teacher"]["score"]


def test_baseline_api_teacher_repeated_samples_and_local_small_model(tmp_path, server, local_dir):
    app, url = server
    p = write_task(tmp_path / "task", n_inputs=12, n_gold=10, overrides={
        "examples": EXAMPLES, "teacher": _api(url), "volume_per_month": 1_000_000,
        "baseline": {"n": N, "samples": 3, "small_model": _local(local_dir), "student_ms_per_item": 0.2}})
    task, out = load_task(p), tmp_path / "run"
    calls0 = app.state.calls
    r = baseline(task, out, volume=2_000_000)
    items = read_jsonl(out / "baseline" / "items.jsonl")
    _check_scores(r, items)
    # 3 samples per input + 2 prompt variants, each its own paid call
    assert app.state.calls - calls0 == N * 3 + N * 2
    assert r["consistency"]["repeated_samples"] == 3
    assert set(r["consistency"]["agreement_with_base"]) == {"sample 1", "sample 2", "examples reversed", "labels reversed"}
    assert all(len(it["samples"]) == 2 for it in items)
    n_t, tin, tout = _ledger(out, "baseline")
    assert n_t == N * 3
    assert r["cost"]["teacher_usd_per_call"] == pytest.approx(tin * 100 / 1e6 + tout * 400 / 1e6)
    assert r["cost"]["volume_per_month"] == 2_000_000
    assert r["small_model"]["shots"] == "zero-shot"


def test_consistency_and_verdict_by_hand():
    base = ["a", "b", "a", None]
    c = consistency(base, {"v1": ["a", "b", "b", None], "v2": ["a", "a", "a", None]})
    assert c["consistent"] == 0.25 and c["inconsistent"] == 0.75  # only item 0 agrees everywhere; None never agrees
    assert c["agreement_with_base"] == {"v1": 0.5, "v2": 0.5}
    assert consistency(base, {})["measured"] is False

    def m(teacher=0.9, inc=0.05, small=0.5, be=2.0):
        return {"teacher": {"score": teacher}, "consistency": {"inconsistent": inc}, "small_model": {"score": small},
                "cost": {"break_even_months": be, "volume_per_month": 1000, "monthly_saving": 10.0, "one_off_usd": 20.0,
                         "teacher_usd_per_month": 11.0, "student_usd_per_month": 1.0}}

    cfg = BaselineConfig()
    assert verdict(m(), cfg)["decision"] == "go: distil"
    v = verdict(m(inc=0.18), cfg)
    assert v["decision"].startswith("fix") and any("inconsistent on 18% of inputs" in t for t in v["reasons"])
    v = verdict(m(small=0.873), cfg)
    assert v["decision"].startswith("go, lightly") and any("97% of teacher" in t for t in v["reasons"])
    v = verdict(m(be=31.0), cfg)
    assert v["decision"] == "no-go" and any("volume too low: break-even in 2.6 years" in t for t in v["reasons"])
    assert verdict(m(teacher=0.5), cfg)["decision"] == "no-go"
    assert verdict(m(be=None), cfg)["decision"] == "no-go"


def test_prompt_variants_and_remap(tmp_path):
    task = load_task(write_task(tmp_path, overrides={"examples": EXAMPLES, "baseline": {"instructions": ["Colour?"]}}))
    names = [n for n, _ in prompt_variants(task)]
    assert names == ["examples reversed", "labels reversed", "instruction 1"]
    v = dict(prompt_variants(task))
    assert [e.output for e in v["examples reversed"].examples] == ["green", "red"]
    assert v["labels reversed"].labels == LABELS[::-1] and task.labels == LABELS
    a = Answer(label="blue", probs=[0.7, 0.2, 0.1])  # in reversed order: blue, green, red
    assert remap(a, LABELS[::-1], LABELS).probs == [0.1, 0.2, 0.7]


def test_student_latency_is_measured(tmp_path):
    from protege.students.classifier import StaticClassifier
    from tiny import minilm_tokenizer

    task = load_task(write_task(tmp_path))
    model = StaticClassifier(np.random.default_rng(0).normal(size=(30522, 16)).astype(np.float32),
                             minilm_tokenizer(), LABELS)
    model.save_pretrained(tmp_path / "run" / "train" / "student")
    st = student_latency(task, tmp_path / "run", ["some text"] * 5, None)
    assert st["source"] == "timed: trained student" and 0 < st["single_s_p50"] < 0.5

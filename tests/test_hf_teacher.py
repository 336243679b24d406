"""HFTeacher on a tiny random Llama with the real SmolLM2 tokenizer, checked against brute force.

The brute-force references run the *whole* prompt through the model with no cache and no padding, so
they check the prefix-KV-cache reuse, the right padding, the position ids and the label-token choice.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from protege.task import TaskError, parse_task
from protege.registry import make_teacher
from protege.teachers.prompts import build_messages
from protege.teachers.hf import HFTeacher, load_causal_lm
from tiny import base_task, deep_merge, smollm2_tokenizer, tiny_llama

TEXTS = [
    "hi",
    "the shiny cherry thing number 3, which was found in the old brick house near the river bank",
    "moss on a leaf",
    "Sky and ocean: both are as blue as denim or sapphire. " * 3,
    "tomato",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: extra threads only spin


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok), seed=0)


def _task(**over):
    return parse_task(deep_merge(base_task(), over))


def _teacher(model, tok, **over) -> HFTeacher:
    return HFTeacher(_task(**over), model=model, tokenizer=tok)


def _full_prompt(t: HFTeacher, text: str) -> list[int]:
    return t.prefix_ids + t.request(text)["input_ids"] + t.suffix_ids


@torch.no_grad()
def _brute_first_token(model, tok, t: HFTeacher, text: str, labels: list[str]) -> np.ndarray:
    logits = model(input_ids=torch.tensor([_full_prompt(t, text)])).logits[0, -1]
    firsts = [tok(" " + lab, add_special_tokens=False).input_ids[0] for lab in labels]
    return torch.softmax(logits[firsts].double(), -1).numpy()


@torch.no_grad()
def _brute_sequence(model, tok, t: HFTeacher, text: str, labels: list[str]) -> np.ndarray:
    prompt = _full_prompt(t, text)
    scores = []
    for lab in labels:
        lab_ids = tok(" " + lab, add_special_tokens=False).input_ids
        logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + lab_ids])).logits[0].double(), -1)
        scores.append(sum(float(logp[len(prompt) - 1 + j, tid]) for j, tid in enumerate(lab_ids)))
    s = np.array(scores)
    return np.exp(s - s.max()) / np.exp(s - s.max()).sum()


def test_prompt_is_the_chat_template_with_prefilled_answer(model, tok):
    t = _teacher(model, tok)
    text = TEXTS[1]
    msgs = build_messages(t.task, text) + [{"role": "assistant", "content": "Colour:"}]
    want = tok.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
    assert tok.decode(_full_prompt(t, text)) == want
    assert want.endswith("<|im_start|>assistant\nColour:")
    assert "a ripe cherry" in want  # the worked example is a chat turn
    assert t.first_token_mode
    assert [ids[0] for ids in t.label_ids] == [tok(" " + x, add_special_tokens=False).input_ids[0] for x in t.task.labels]


def test_probs_sum_to_one_and_soft_is_logits(model, tok):
    t = _teacher(model, tok)
    answers = t.answer([t.request(x) for x in TEXTS])
    assert len(answers) == len(TEXTS)
    for a in answers:
        assert a.status == "ok" and a.soft == "logits"
        assert len(a.probs) == 3 and sum(a.probs) == pytest.approx(1.0, abs=1e-6)
        assert all(0 <= p <= 1 for p in a.probs)
        assert a.label == t.task.labels[int(np.argmax(a.probs))]
        assert a.tokens_in > len(t.prefix_ids) and a.tokens_out == 1
        assert a.latency_s > 0 and a.cost_usd == pytest.approx(a.latency_s * 0.5 / 3600)


def test_first_token_mode_matches_brute_force(model, tok):
    t = _teacher(model, tok)
    answers = t.answer([t.request(x) for x in TEXTS])
    got = np.array([a.probs for a in answers])
    want = np.array([_brute_first_token(model, tok, t, x, t.task.labels) for x in TEXTS])
    np.testing.assert_allclose(got, want, atol=1e-4)
    # non-trivial: the inputs really move the distribution (else the comparison proves nothing)
    assert np.ptp(want, axis=0).max() > 0.05


def test_batched_equals_one_at_a_time(model, tok):
    t = _teacher(model, tok)
    reqs = [t.request(x) for x in TEXTS]
    assert len({len(r["input_ids"]) for r in reqs}) >= 4  # different lengths → real padding
    batched = np.array([a.probs for a in t.answer(reqs)])
    single = np.array([t.answer([r])[0].probs for r in reqs])
    np.testing.assert_allclose(batched, single, atol=1e-4)
    # and a reversed batch order gives the same per-item answers
    rev = np.array([a.probs for a in t.answer(reqs[::-1])])[::-1]
    np.testing.assert_allclose(rev, single, atol=1e-4)


def test_shared_first_token_uses_sequence_mode(model, tok):
    labels = ["sports news", "sports betting", "world news"]
    ids = [tok(" " + lab, add_special_tokens=False).input_ids for lab in labels]
    assert ids[0][0] == ids[1][0]  # the premise of this test
    t = _teacher(model, tok, labels=labels, examples=[{"input": "the cup final", "output": "sports news"}])
    assert not t.first_token_mode
    reqs = [t.request(x) for x in TEXTS]
    assert all(r["mode"] == "sequence" for r in reqs)
    answers = t.answer(reqs)
    got = np.array([a.probs for a in answers])
    want = np.array([_brute_sequence(model, tok, t, x, labels) for x in TEXTS])
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.ptp(want, axis=0).max() > 0.05
    assert all(sum(a.probs) == pytest.approx(1.0, abs=1e-6) for a in answers)
    single = np.array([t.answer([r])[0].probs for r in reqs])
    np.testing.assert_allclose(got, single, atol=1e-4)


def test_truncation_to_max_input_tokens(model, tok):
    t = _teacher(model, tok, teacher={"max_input_tokens": 8})
    long = "one two three four five six seven eight nine ten eleven twelve thirteen"
    r = t.request(long)
    assert r["input_ids"] == tok(long, add_special_tokens=False).input_ids[:8]
    assert len(r["input_ids"]) == 8
    # text past the cut does not change the request (so the ledger key is the same)
    assert t.request(long + " and much more text after the cut") == r
    assert t.request("  " + long + "\n") == r  # surrounding whitespace is stripped
    a = t.answer([r])[0]
    assert a.status == "ok"
    np.testing.assert_allclose(a.probs, _brute_first_token(model, tok, t, long, t.task.labels), atol=1e-4)


def test_request_depends_on_prompt_and_labels(model, tok):
    a = _teacher(model, tok).request("x")
    b = _teacher(model, tok, instruction="Something else.").request("x")
    c = _teacher(model, tok, labels=["red", "green", "teal"], examples=[]).request("x")
    assert a != b and a != c and a["input_ids"] == b["input_ids"]


def test_no_answer_prefix_scores_label_without_leading_space(model, tok):
    t = _teacher(model, tok, teacher={"answer_prefix": ""})
    assert [ids for ids in t.label_ids] == [tok(x, add_special_tokens=False).input_ids for x in t.task.labels]
    msgs = build_messages(t.task, "moss")
    want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok.decode(_full_prompt(t, "moss")) == want


def test_base_model_without_chat_template(model, tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    t = _teacher(model, plain)
    text = tok.decode(_full_prompt(t, "moss on a leaf"))
    assert text.endswith("Input: moss on a leaf\nOutput: Colour:")
    assert "Output:  red" not in text and "Output: Colour: red" in text  # the worked example
    got = t.answer([t.request("moss on a leaf")])[0].probs
    np.testing.assert_allclose(got, _brute_first_token(model, plain, t, "moss on a leaf", t.task.labels), atol=1e-4)


def test_broken_batch_is_reported_per_item(model, tok):
    t = _teacher(model, tok)
    bad = {**t.request("x"), "input_ids": [len(tok) + 10]}  # id outside the vocabulary
    answers = t.answer([t.request("fine"), bad])
    assert [a.status for a in answers] == ["error", "error"]
    assert all(a.error and a.label is None for a in answers)


def test_time_single(model, tok):
    t = _teacher(model, tok)
    s = t.time_single(TEXTS[:2])
    assert len(s) == 2 and all(x > 0 for x in s)


def test_make_teacher_reports_a_wrong_local_path(tmp_path):
    task = _task(teacher={"model": str(tmp_path / "no-such-model"), "gguf_file": None})
    with pytest.raises(TaskError, match="no-such-model.*does not exist"):
        make_teacher(task)
    with pytest.raises(TaskError, match="gguf_file.*nope.gguf"):
        load_causal_lm(str(tmp_path), gguf_file="nope.gguf")

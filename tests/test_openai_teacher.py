"""The `openai` teacher backend over real HTTP, against a real SmolLM2-135M-Instruct on 127.0.0.1.

Nothing is mocked: protege.serve.local_lm serves the model with the OpenAI chat-completions protocol, the
teacher talks to it through the openai SDK. The server counts the completions it answers, which is how
the ledger test proves a re-run sends no request.
"""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest

from protege.stages.generate import label_with_ledger
from protege.teachers.ledger import Ledger
from protege.task import TaskError, parse_task
from protege.registry import make_teacher
from protege.teachers.prompts import parse_label
from protege.teachers.openai import OpenAITeacher
from protege.teachers.logprobs import label_probs_from_top_logprobs

KEY_ENV = "PROTEGE_TEST_TEACHER_KEY"
LABELS = ["sports", "business", "tech"]
EXAMPLES = [
    {"input": "The striker scored twice in the cup final.", "output": "sports"},
    {"input": "Shares in the bank fell 5% after its profit warning.", "output": "business"},
    {"input": "The new chip doubles the speed of laptops.", "output": "tech"},
]
NEWS = [
    "The tennis player won the championship in straight sets.",
    "The company reported record quarterly earnings and raised its dividend.",
    "Apple released a new version of its iPhone software with faster apps.",
]


def make_task(tmp_path, base_url, *, labels=LABELS, examples=EXAMPLES,
              instruction="What is the topic of the news article?", **teacher):
    raw = {
        "name": "news-topics", "kind": "classify", "instruction": instruction, "labels": labels, "examples": examples,
        "data": {"inputs": "inputs.jsonl", "gold": "gold.jsonl"},
        "teacher": {"backend": "openai", "model": "smollm2-135m-instruct", "base_url": base_url, "api_key_env": KEY_ENV,
                    "max_tokens": 4, "concurrency": 2, "price_in_per_1m": 1.0, "price_out_per_1m": 2.0, **teacher},
    }
    return parse_task(raw, root=tmp_path)


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-local")
    return "sk-test-local"


# -- soft labels from logprobs --------------------------------------------------------------------

@pytest.mark.parametrize("answer_prefix", ["", "Topic:"])
def test_logprob_soft_labels(tmp_path, lm_server, key, answer_prefix):
    url, app = lm_server(logprobs=True)
    task = make_task(tmp_path, url, answer_prefix=answer_prefix)
    teacher = make_teacher(task)
    assert isinstance(teacher, OpenAITeacher)
    reqs = [teacher.request(t) for t in NEWS]
    before = app.state.calls
    answers = teacher.answer(reqs)
    assert app.state.calls - before == len(NEWS)
    for req, a in zip(reqs, answers):
        assert a.status == "ok", a.error
        assert a.soft == "logprobs"
        assert len(a.probs) == len(LABELS) and math.isclose(sum(a.probs), 1.0, abs_tol=1e-9)
        assert all(0.0 <= p <= 1.0 for p in a.probs)
        assert a.label == LABELS[int(np.argmax(a.probs))]
        assert 0.0 <= a.missing_mass <= 1.0
        assert a.tokens_in > 50 and a.tokens_out > 0  # the prompt carries the instruction and three worked examples
        assert a.cost_usd == pytest.approx((a.tokens_in * 1.0 + a.tokens_out * 2.0) / 1e6)
        # the server's own answer, fetched without the teacher, parses to the same label
        r = httpx.post(f"{url}/chat/completions", json=req, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        r.raise_for_status()
        text = r.json()["choices"][0]["message"]["content"]
        assert text == a.text
        assert parse_label(text, LABELS, answer_prefix) == a.label
        if answer_prefix:
            assert text.startswith(answer_prefix)
    # the model is not a constant classifier on these inputs: sport / business / tech news get their own label
    assert [a.label for a in answers] == LABELS
    assert max(answers[0].probs) > 0.5


def test_server_without_logprobs_gives_hard_labels(tmp_path, lm_server, key):
    url, _ = lm_server(logprobs=False)
    teacher = make_teacher(make_task(tmp_path, url))
    answers = teacher.answer([teacher.request(t) for t in NEWS])
    for a in answers:
        assert a.status == "ok", a.error
        assert a.soft == "hard" and a.missing_mass == 0.0
        assert a.probs == [1.0 if lab == a.label else 0.0 for lab in LABELS]
    assert [a.label for a in answers] == LABELS  # greedy: same answers as the logprobs server


def test_answer_outside_label_set_is_an_error(tmp_path, lm_server, key):
    url, _ = lm_server(logprobs=True)
    # no examples and an instruction that invites chat: the model greets instead of naming a code word
    task = make_task(tmp_path, url, labels=["ALPHA-7", "BRAVO-9"], examples=[],
                     instruction="Reply to the user with a long friendly greeting.")
    teacher = make_teacher(task)
    (a,) = teacher.answer([teacher.request("Hello! How are you today?")])
    assert a.status == "error" and a.label is None and a.probs is None
    assert "not one of the labels" in a.error and "ALPHA-7" in a.error and "BRAVO-9" in a.error
    assert a.text and a.tokens_out > 0  # the call happened and was paid for; the ledger records that


def test_ledger_second_pass_makes_no_calls(tmp_path, lm_server, key):
    url, app = lm_server(logprobs=True)
    task = make_task(tmp_path, url)
    db = tmp_path / "ledger.sqlite"

    before = app.state.calls
    with Ledger(db) as ledger:
        first, stats1 = label_with_ledger(make_teacher(task), NEWS, ledger, stage="generate")
    assert app.state.calls - before == len(NEWS)
    assert stats1["calls"] == len(NEWS) and stats1["cache_hits"] == 0 and stats1["failed"] == 0
    assert stats1["usd"] > 0

    before = app.state.calls
    with Ledger(db) as ledger:  # a fresh process: new ledger connection, new teacher
        second, stats2 = label_with_ledger(make_teacher(task), NEWS, ledger, stage="generate")
        summary = ledger.summary()
    assert app.state.calls == before, "a re-run must be answered from the ledger"
    assert stats2["calls"] == 0 and stats2["cache_hits"] == len(NEWS)
    assert [[a.to_json() for a in item] for item in second] == [[a.to_json() for a in item] for item in first]
    assert summary[0]["calls"] == len(NEWS) and summary[0]["cache_hits"] == len(NEWS)


def test_missing_api_key_without_base_url(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    task = make_task(tmp_path, None)
    with pytest.raises(TaskError, match=rf"teacher.api_key_env.*{KEY_ENV} is not set"):
        make_teacher(task)


def test_api_key_is_sent_and_checked(tmp_path, lm_server, monkeypatch):
    url, _ = lm_server(logprobs=True, api_key="sk-right")
    task = make_task(tmp_path, url, max_tokens=2, max_retries=0)
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    teacher = make_teacher(task)
    (bad,) = teacher.answer([teacher.request(NEWS[0])])
    assert bad.status == "error" and "AuthenticationError" in bad.error
    monkeypatch.setenv(KEY_ENV, "sk-right")
    teacher = make_teacher(task)
    (good,) = teacher.answer([teacher.request(NEWS[0])])
    assert good.status == "ok", good.error


# -- the server itself ----------------------------------------------------------------------------

def test_server_protocol(lm_server):
    url, _ = lm_server(logprobs=True)
    models = httpx.get(f"{url}/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "smollm2-135m-instruct"
    assert httpx.post(f"{url}/chat/completions", json={"model": "m", "messages": "hi"}).status_code == 422

    body = {"model": "m", "messages": [{"role": "user", "content": "Write a poem about the sea."}], "max_tokens": 3,
            "temperature": 0, "logprobs": True, "top_logprobs": 4}
    r = httpx.post(f"{url}/chat/completions", json=body, timeout=60).json()
    ch = r["choices"][0]
    assert r["object"] == "chat.completion" and ch["message"]["role"] == "assistant"
    assert ch["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 3
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + 3
    content = ch["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == ch["message"]["content"]
    for c in content:
        assert len(c["top_logprobs"]) == 4
        assert c["top_logprobs"][0]["token"] == c["token"]  # greedy picks the most likely token
        assert c["logprob"] == pytest.approx(c["top_logprobs"][0]["logprob"]) and c["logprob"] <= 0
        assert sum(math.exp(t["logprob"]) for t in c["top_logprobs"]) <= 1 + 1e-6
        assert bytes(c["bytes"]).decode() == c["token"]

    # seeded sampling is reproducible; a different seed gives a different draw
    body.update(temperature=1.5, max_tokens=8, logprobs=False, seed=7)
    a = httpx.post(f"{url}/chat/completions", json=body, timeout=60).json()
    b = httpx.post(f"{url}/chat/completions", json=body, timeout=60).json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    assert a["choices"][0]["logprobs"] is None
    c = httpx.post(f"{url}/chat/completions", json={**body, "seed": 8}, timeout=60).json()
    assert c["choices"][0]["message"]["content"] != a["choices"][0]["message"]["content"]


# -- label_probs_from_top_logprobs ----------------------------------------------------------------

def _pos(token, *alts):
    """One logprobs.content entry: the generated ``token`` and its (token, prob) top alternatives."""
    top = [{"token": t, "logprob": math.log(p)} for t, p in alts]
    return {"token": token, "logprob": next((x["logprob"] for x in top if x["token"] == token), math.log(0.01)),
            "top_logprobs": top}


def test_probs_sum_case_variants_of_one_label():
    content = [_pos(" Sports", (" Sports", 0.4), ("sports", 0.2), (" SPORTS", 0.1), (" business", 0.2), (" the", 0.1))]
    probs, missing = label_probs_from_top_logprobs(content, LABELS)
    assert probs == pytest.approx([0.7 / 0.9, 0.2 / 0.9, 0.0])
    assert missing == pytest.approx(0.1)


def test_probs_ignore_token_shared_by_two_labels():
    labels = ["negative", "neutral", "positive"]
    content = [_pos(" negative", (" negative", 0.5), (" ne", 0.3), (" positive", 0.1), (" neutral", 0.05))]
    probs, missing = label_probs_from_top_logprobs(content, labels)
    assert probs == pytest.approx([0.5 / 0.65, 0.05 / 0.65, 0.1 / 0.65])
    assert missing == pytest.approx(0.35)  # " ne" could be either label: counted as missing, not guessed


def test_probs_skip_answer_prefix_positions():
    # "Topic: tech" — the "Topic" position has a label-like alternative ("Business" at 0.001) that must not be scored
    content = [_pos("Topic", ("Topic", 0.97), ("Business", 0.001), ("Tech", 0.002)), _pos(":", (":", 0.99)),
               _pos(" tech", (" tech", 0.6), (" business", 0.2), (" technology", 0.1))]
    probs, missing = label_probs_from_top_logprobs(content, LABELS, "Topic:")
    assert probs == pytest.approx([0.0, 0.25, 0.75])
    assert missing == pytest.approx(0.2)


def test_probs_none_when_answer_is_not_a_label():
    content = [_pos(" football", (" football", 0.5), (" sports", 0.2))]
    assert label_probs_from_top_logprobs(content, LABELS) == (None, 1.0)
    assert label_probs_from_top_logprobs([], LABELS) == (None, 1.0)
    # no top_logprobs (top_logprobs=0): the generated token alone decides, with its own probability
    probs, missing = label_probs_from_top_logprobs([{"token": "business", "logprob": math.log(0.8)}], LABELS)
    assert probs == [0.0, 1.0, 0.0] and missing == pytest.approx(0.2)

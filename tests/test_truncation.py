"""One input cannot cost more than ``max_input_tokens`` allows: inputs are cut before the request is built
and priced — by the teacher's tokenizer for local teachers, by a character budget for API teachers (a
line without spaces, a CJK text) — the cut inputs are counted in ``generate/stats.json``, and a request
whose estimate alone passes the budget fails its item without being sent."""

from __future__ import annotations

import json

import pytest

from fault_server import create_fault_app, serve
from protege import progress
from protege.stages.generate import generate, label_with_ledger
from protege.teachers.ledger import Ledger
from protege.task import parse_task
from protege.registry import make_teacher
from protege.teachers.prompts import estimate_text_tokens, truncate_words

KEY_ENV = "PROTEGE_FAULT_KEY"
LABELS = ["sports", "business", "tech"]
JAPANESE = "東京の株式市場は今日、大きく値上がりしました。" * 800  # ~18,000 characters, no spaces
SPACELESS = "x" * 50_000


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-fault")
    monkeypatch.setitem(progress.QUIET, "on", True)


@pytest.fixture(scope="module")
def server():
    app = create_fault_app()
    url, stop = serve(app)
    yield url, app.state.s
    stop()


def raw_task(url: str, **teacher) -> dict:
    return {"name": "trunc", "kind": "classify", "instruction": "What is the topic of the news article?",
            "labels": LABELS, "data": {"inputs": "inputs.jsonl", "gold": "gold.jsonl"},
            "teacher": {"backend": "openai", "model": "fault-model", "base_url": url, "api_key_env": KEY_ENV,
                        "max_tokens": 8, "top_logprobs": 5, "price_in_per_1m": 1.0, "price_out_per_1m": 2.0,
                        "retry_base_s": 0.01, "retry_max_s": 0.05, **teacher}}


def _user(req: dict) -> str:
    return req["messages"][-1]["content"]


def test_api_requests_are_cut_by_a_character_budget(server):
    url, _ = server
    teacher = make_teacher(parse_task(raw_task(url, max_input_tokens=256)))
    assert len(_user(teacher.request(SPACELESS))) <= 5 * 256           # was 50,000: sent whole
    assert len(_user(teacher.request(JAPANESE))) <= 256                # was ~18,000: not cut at all
    assert estimate_text_tokens(_user(teacher.request(JAPANESE))) <= 256
    english = " ".join(f"word{i}" for i in range(1000))
    assert _user(teacher.request(english)) == " ".join(english.split()[:192])  # the word rule, unchanged
    short = "Arsenal won 3-1 at home."
    assert _user(teacher.request(short)) == short
    assert teacher.truncated(JAPANESE) and teacher.truncated(SPACELESS) and not teacher.truncated(short)
    # the price estimate counts a CJK character as a token (not 1/3 of one): the budget gate's upper bound
    req = teacher.request(JAPANESE)
    assert teacher.estimate_tokens(req) >= len(_user(req)) + 8
    for text in ("", "   ", "a", "日本"):
        assert truncate_words(text, 8) == text.strip()


def test_generate_cuts_before_sending_and_counts_the_cut_inputs(tmp_path, server):
    url, state = server
    root = tmp_path / "t"
    root.mkdir()
    inputs = ["Arsenal won at home [label=sports]", SPACELESS + " [label=tech]", "[label=business] " + JAPANESE,
              "Shares rose [label=business]"]
    (root / "inputs.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in inputs))
    (root / "gold.jsonl").write_text(json.dumps({"text": "g [label=tech] " + JAPANESE, "label": "tech"},
                                                ensure_ascii=False) + "\n")
    task = parse_task(raw_task(url, max_input_tokens=256), root=root)
    mark = len(state.log)
    out = generate(task, tmp_path / "run")
    sent = state.log[mark:]
    assert len(sent) == 5 and max(len(e["item"]) for e in sent) <= 5 * 256
    stats = json.loads((out / "stats.json").read_text())
    assert stats["inputs"]["truncated"] == 2 and stats["gold"]["truncated"] == 1
    with Ledger(tmp_path / "run" / "ledger.sqlite") as led:  # no 50 MB ledger rows either
        assert max(len(r[0]) for r in led.db.execute("SELECT request FROM calls")) < 5 * 256 + 1000


def test_a_request_that_alone_passes_the_budget_fails_its_item_unsent(tmp_path, server):
    url, state = server
    # $1 per 1k input tokens; budget $1: a 2,000-token (cut) Japanese input alone is ~$2
    task = parse_task(raw_task(url, max_input_tokens=2000, price_in_per_1m=1000.0, concurrency=2,
                               budget_usd=1.0))
    teacher = make_teacher(task)
    texts = ["a [label=sports]", "[label=tech] " + JAPANESE, "b [label=business]"]
    mark = len(state.log)
    with Ledger(tmp_path / "l.sqlite") as led:
        out, stats = label_with_ledger(teacher, texts, led, stage="generate", budget_usd=1.0)
        row = led.db.execute("SELECT status, reason, requests, cost_usd FROM calls WHERE reason='over_budget'").fetchall()
    teacher.close()
    assert [o[0].status for o in out] == ["ok", "error", "ok"]
    big = out[1][0]
    assert big.extra["reason"] == "over_budget" and "more than the whole budget $1.0000" in big.error
    assert "max_input_tokens" in big.error
    assert sorted(e["item"] for e in state.log[mark:]) == ["a [label=sports]", "b [label=business]"]  # never sent
    assert stats["calls"] == 2 and stats["failures"] == {"over_budget": 1}
    assert row == [("error", "over_budget", 0, 0.0)]  # recorded (retried on a later run), nothing paid

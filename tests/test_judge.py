"""Pairwise LLM-as-judge against tiny deterministic backends registered like any other teacher."""

from __future__ import annotations

import re

import pytest

from protege.stages.evaluate.judge import JUDGE_LABELS, judge_task, pairwise_judge
from protege.teachers.ledger import Ledger
from protege.task import parse_task
from protege.teachers.base import Answer, Teacher
from protege.registry import TEACHERS, register_teacher
from protege.teachers.prompts import build_messages

_ANS = re.compile(r"<answer_A>\n(.*?)\n</answer_A>\n<answer_B>\n(.*?)\n</answer_B>", re.S)


@register_teacher("test-judge-fair")
class FairJudge(Teacher):
    """Prefers the answer with more words from the input; ties on equal counts. Order-blind."""

    name = "test-judge-fair"

    def request(self, text: str, sample: int = 0) -> dict:
        return {"messages": build_messages(self.task, text), "labels": self.task.labels}

    def verdict(self, prompt: str) -> str:
        a, b = _ANS.search(prompt).groups()
        src = set(re.search(r"<input>\n(.*?)\n</input>", prompt, re.S).group(1).split())
        sa, sb = len(src & set(a.split())), len(src & set(b.split()))
        return "A" if sa > sb else "B" if sb > sa else "tie"

    def answer(self, requests: list[dict]) -> list[Answer]:
        self.sent = getattr(self, "sent", 0) + len(requests)
        return [Answer(label=self.verdict(r["messages"][-1]["content"]), soft="hard", tokens_in=50, tokens_out=1,
                       cost_usd=0.001) for r in requests]


@register_teacher("test-judge-first")
class FirstJudge(FairJudge):
    """Always prefers whatever is shown first: pure position bias."""

    name = "test-judge-first"

    def verdict(self, prompt: str) -> str:
        return "A"


def _task():
    return parse_task({"name": "summ", "instruction": "Summarise the input.", "labels": ["x", "y"],
                       "data": {"inputs": "i.jsonl", "gold": "g.jsonl"},
                       "teacher": {"backend": "openai", "model": "judge-model", "answer_prefix": "Topic:"}})


TEXTS = ["red fox jumps high", "blue sky over sea", "green grass grows fast", "old man reads book"]
TEACHER_OUT = ["red fox", "sky", "green grass grows", "a man"]
STUDENT_OUT = ["red fox jumps", "blue sky sea", "grass", "a man"]  # wins, wins, loses, ties


def test_judge_task_rewrites_labels_not_backend():
    jt = judge_task(_task())
    assert jt.labels == JUDGE_LABELS and jt.examples == [] and jt.teacher.answer_prefix == ""
    assert jt.teacher.model == "judge-model" and jt.teacher.backend == "openai"


def test_fair_judge_position_swapped_and_cached(tmp_path):
    judge = TEACHERS["test-judge-fair"](judge_task(_task()))
    with Ledger(tmp_path / "ledger.sqlite") as led:
        r = pairwise_judge(judge, led, "Summarise the input.", TEXTS, TEACHER_OUT, STUDENT_OUT)
        assert [it["verdict"] for it in r["items"]] == ["student", "student", "teacher", "tie"]
        assert (r["wins"], r["losses"], r["ties"]) == (2, 1, 1)
        assert r["student_win_rate"] == pytest.approx((2 + 0.5) / 4)
        assert r["position_consistency"] == 1.0 and r["first_position_rate"] == pytest.approx(0.5)
        # the identical pair ("a man") is a tie without a call: 3 items x 2 orders are paid for
        assert r["identical"] == 1 and r["items"][3].get("identical")
        assert r["calls"] == 6 and judge.sent == 6 and r["usd"] == pytest.approx(0.006)
        again = pairwise_judge(judge, led, "Summarise the input.", TEXTS, TEACHER_OUT, STUDENT_OUT)
        assert again["calls"] == 0 and again["cache_hits"] == 6 and judge.sent == 6  # answered from the ledger
        assert again["student_win_rate"] == r["student_win_rate"]
        assert {row["stage"] for row in led.summary()} == {"judge"}


def test_position_bias_is_cancelled_by_the_swap(tmp_path):
    judge = TEACHERS["test-judge-first"](judge_task(_task()))
    with Ledger(tmp_path / "ledger.sqlite") as led:
        r = pairwise_judge(judge, led, "Summarise the input.", TEXTS, TEACHER_OUT, STUDENT_OUT)
    assert r["ties"] == 4 and r["student_win_rate"] == 0.5  # a judge that only picks "first" decides nothing
    assert r["position_consistency"] == 0.0 and r["first_position_rate"] == 1.0

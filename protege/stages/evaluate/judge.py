"""Pairwise LLM-as-judge for generation tasks, through the teacher backend and its ledger.

ROUGE-L and chrF reward overlap with one reference; two good answers worded differently score low.
A judge model comparing the student's answer with the teacher's on the same input is the usual
complement (Zheng et al. 2023, "Judging LLM-as-a-judge"). Two things make it trustworthy enough:

- **Position swap.** Judges prefer whichever answer comes first (or second). Each pair is judged in
  both orders; a verdict counts only when both orders agree, a flip counts as a tie. The share of
  items whose verdict survives the swap is reported (``position_consistency``).
- **The ledger.** Judge calls are teacher calls: same request → answered from the ledger, no new
  cost; every call's tokens and $ are logged under stage ``judge``.

The judge is any :class:`~protege.teachers.base.Teacher` built on :func:`judge_task` — a copy of the
task whose "labels" are ``A``, ``B`` and ``tie`` — so an OpenAI-compatible API, a local model, or a
test backend all work unchanged.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from protege.metrics import bootstrap_ci
from protege.task import TaskSpec

JUDGE_LABELS = ["A", "B", "tie"]
JUDGE_INSTRUCTION = (
    "You are a strict judge. Given a task, an input and two candidate answers A and B, decide which answer "
    "does the task better: correct, complete, faithful to the input, no invented facts. Length is not quality. "
    "Reply with exactly one of: A, B, tie.")


def judge_task(task: TaskSpec) -> TaskSpec:
    """The task as the judge sees it: same teacher settings, labels A / B / tie, no few-shot examples."""
    # the judge reads the input and two answers: give it room (inputs are clipped to max_input_tokens)
    room = max(task.teacher.max_input_tokens * 2 + 2 * task.teacher.max_tokens + 64, 512)
    teacher = task.teacher.model_copy(update={"answer_prefix": "", "calibrate": False, "samples": 1,
                                              "temperature": 0.0, "max_tokens": 4, "max_input_tokens": room,
                                              "paraphrases": [], "shuffle_labels": False})
    # a classify task whatever the task's kind: the judge picks one of A / B / tie
    return task.model_copy(update={"kind": "classify", "schema_": None, "instruction": JUDGE_INSTRUCTION,
                                   "labels": list(JUDGE_LABELS), "examples": [], "teacher": teacher})


def judge_prompt(task_instruction: str, text: str, a: str, b: str, reference: str | None = None) -> str:
    """One judge input. Candidates are fenced with tags so an answer cannot impersonate the prompt."""
    ref = f"\n<reference>\n{reference}\n</reference>" if reference else ""
    return (f"<task>\n{task_instruction.strip()}\n</task>\n<input>\n{text}\n</input>{ref}\n"
            f"<answer_A>\n{a}\n</answer_A>\n<answer_B>\n{b}\n</answer_B>\nWhich answer is better: A, B or tie?")


def _b_points(label: str | None, b_is_first: bool) -> float | None:
    """Points for candidate ``b`` from one verdict: 1 win, 0.5 tie, 0 loss, None if no valid verdict."""
    if label not in JUDGE_LABELS:
        return None
    if label == "tie":
        return 0.5
    won_first = label == "A"
    return 1.0 if won_first == b_is_first else 0.0


def pairwise_judge(judge, ledger, instruction: str, texts: Sequence[str], outputs_a: Sequence[str],
                   outputs_b: Sequence[str], references: Sequence[str] | None = None, *,
                   budget_usd: float | None = None, names: tuple[str, str] = ("teacher", "student")) -> dict:
    """Judge ``b`` against ``a`` on every item, in both orders, through ``ledger``.

    Returns the win rate of ``b`` (wins + ½ ties, per item averaged over both orders) with a bootstrap
    CI, win / tie / loss counts after the swap, position consistency, the share of verdicts that went
    to the first position (order bias), the call / cache / $ counts, and per-item verdicts.
    """
    from protege.stages.generate import label_with_ledger
    from protege.kinds import KINDS

    n = len(texts)
    refs = list(references) if references is not None else [None] * n
    # the same answer twice (whitespace aside) is a tie by definition: no judge call is paid for it
    same = [KINDS["generate"].same_answer(str(a), str(b)) for a, b in zip(outputs_a, outputs_b)]
    ask = [i for i in range(n) if not same[i]]
    ab = [judge_prompt(instruction, texts[i], outputs_a[i], outputs_b[i], refs[i]) for i in ask]
    ba = [judge_prompt(instruction, texts[i], outputs_b[i], outputs_a[i], refs[i]) for i in ask]
    answers, stats = label_with_ledger(judge, ab + ba, ledger, stage="judge", samples=1, budget_usd=budget_usd,
                                       description="judge: pairwise, both orders")
    first: list[str | None] = ["tie"] * n
    second: list[str | None] = ["tie"] * n
    for j, i in enumerate(ask):
        first[i] = answers[j][0].label if answers[j][0].status == "ok" else None
        second[i] = answers[len(ask) + j][0].label if answers[len(ask) + j][0].status == "ok" else None
    items, points, firsts, valid, consistent = [], [], 0, 0, 0
    for i in range(n):
        p1, p2 = _b_points(first[i], b_is_first=False), _b_points(second[i], b_is_first=True)
        for lab in (first[i], second[i]):
            if lab in ("A", "B"):
                valid += 1
                firsts += lab == "A"
        got = [p for p in (p1, p2) if p is not None]
        consistent += len(got) == 2 and p1 == p2 and not same[i]  # over the items actually judged
        if len(got) == 2 and p1 == p2:
            verdict = {1.0: names[1], 0.0: names[0], 0.5: "tie"}[p1]
        else:
            verdict = "tie" if got else "invalid"
        score = float(np.mean(got)) if got else 0.5
        points.append(score)
        items.append({"first_order": first[i], "swapped_order": second[i], "verdict": verdict, "points": score,
                      **({"identical": True} if same[i] else {})})
    pts = np.array(points, dtype=float)
    verdicts = [it["verdict"] for it in items]
    return {
        "judge": getattr(judge, "name", "?"), "n": n, f"{names[1]}_win_rate": float(pts.mean()) if n else float("nan"),
        "win_rate_ci": list(bootstrap_ci(pts)), "wins": verdicts.count(names[1]), "losses": verdicts.count(names[0]),
        "ties": verdicts.count("tie"), "invalid": verdicts.count("invalid"),
        "position_consistency": consistent / len(ask) if ask else None,
        "first_position_rate": firsts / valid if valid else None,
        "calls": stats["calls"], "cache_hits": stats["cache_hits"], "usd": stats["usd"], "identical": sum(same),
        "items": items,
        "rule": "judged in both orders; a flip counts as a tie; identical answers are a tie without a call; "
                "win rate = (wins + ties / 2) / n",
    }

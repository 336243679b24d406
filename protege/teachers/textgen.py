"""Extract / generate tasks, teacher side: the prompt, text requests for any backend, summarised answers.

A classify teacher's ``request()`` asks for a label; an extract or generate task needs free text. Rather
than teach every backend the task kinds, :class:`TextTeacher` wraps any teacher and builds its requests
through the backend's own generation API:

- ``extract_request`` where the backend has one (OpenAI-compatible: ``response_format`` json_schema,
  the answer validated with ``jsonschema`` and re-asked when it breaks the schema);
- ``generation_request`` otherwise (local HF models: greedy decoding with the top-k log-probs of every
  generated token; OpenAI-compatible servers: ``top_logprobs``).

The request is what the ledger hashes, so caching, resume after ``kill -9`` and the budget gate work
exactly as for classify. The prompt is the task's instruction (plus, for extract, the schema), its worked
examples as chat turns, then the input; the student is trained on the same instruction without the
examples (:func:`system_text`).
"""

from __future__ import annotations

import math
from collections import Counter

from protege.kinds import KINDS, kind_of
from protege.task import TaskSpec
from protege.teachers.base import Answer, Teacher
from protege.teachers.prompts import preclip, teacher_messages, truncate_words


class TextTeacher:
    """Any teacher, answering extract / generate requests; everything else is delegated to it."""

    def __init__(self, inner: Teacher, task: TaskSpec):
        self.inner, self.task, self.cfg, self.name = inner, task, inner.cfg, inner.name

    def __getattr__(self, attr):  # acall / run / estimate_tokens / display_name / close ... of the backend
        if attr == "time_single":  # the backend's version times label scoring: not what this task does
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def _clip(self, text: str) -> str:
        tok = getattr(self.inner, "tok", None)
        if tok is None:
            return truncate_words(text, self.cfg.max_input_tokens)
        ids = tok(preclip(text, self.cfg.max_input_tokens).strip(), add_special_tokens=False).input_ids
        return tok.decode(ids[: self.cfg.max_input_tokens]) if len(ids) > self.cfg.max_input_tokens else text.strip()

    def request(self, text: str, sample: int = 0) -> dict:
        if kind_of(self.task).json and hasattr(self.inner, "extract_request"):
            return self.inner.extract_request(text, self.task.schema_, sample)
        return self.inner.generation_request(teacher_messages(self.task, self._clip(text)), sample)

    def answer(self, requests: list[dict]) -> list[Answer]:
        return self.inner.answer(requests)

    def estimate_cost(self, request: dict) -> float:
        return self.inner.estimate_cost(request)

    def truncated(self, text: str) -> bool:
        return self.inner.truncated(text)

    def close(self) -> None:
        self.inner.close()

    def time_generation(self, texts: list[str]) -> list[float]:
        """Wall seconds per input answered one at a time, not ledgered (local teachers only)."""
        from protege.timing import time_each

        return time_each([self.request(t) for t in texts], lambda r: self.inner.answer([r]))


def text_teacher(task: TaskSpec) -> TextTeacher:
    from protege.registry import make_teacher

    return TextTeacher(make_teacher(task), task)


def _output(a: Answer) -> str:
    return a.text if a.text else (a.label or "")


def _confidence(a: Answer) -> float | None:
    """Geometric-mean probability of the generated tokens (from the stored top-k), None without top-k."""
    p = (a.extra or {}).get("topk")
    if not p:
        return None
    from protege.teachers.topk_store import unpack

    lp = [float(x) for x in unpack(p)["chosen_logprob"] if not math.isnan(float(x))]
    return math.exp(sum(lp) / len(lp)) if lp else None


def summarise_text(answers: list[Answer], kind: str) -> dict:
    """Combine an item's samples: the most frequent output (first sample on ties), agreement rate, status."""
    ok = [a for a in answers if a.status == "ok"]
    if not ok:
        err = next((a.error for a in answers if a.error), "no answer")
        reason = next(((a.extra or {}).get("reason") for a in answers if (a.extra or {}).get("reason")), None)
        return {"output": None, "label": None, "status": "error", "error": err, "reason": reason, "agreement": 0.0,
                "confidence": 0.0, "soft": "none"}

    def key(a: Answer) -> str:
        return KINDS[kind].answer_key(_output(a))

    votes = Counter(key(a) for a in ok)
    top, n_top = votes.most_common(1)[0]
    best = next(a for a in ok if key(a) == top)
    conf = _confidence(best)
    row = {"output": _output(best), "status": "ok", "error": None, "agreement": n_top / len(ok), "samples": len(ok),
           "confidence": 1.0 if conf is None else round(conf, 6), "soft": best.soft,
           "finish_reason": (best.extra or {}).get("finish_reason")}
    row["label"] = row["output"]  # older readers (review, ledger tools) look for `label`
    if len(answers) > 1:
        row["sample_outputs"] = [_output(a) if a.status == "ok" else None for a in answers]
    return row


def best_topk(answers: list[Answer], output: str | None) -> dict | None:
    """The packed top-k of the sample whose text became the row's output (token KD trains on it)."""
    for a in answers:
        if a.status == "ok" and _output(a) == output and (a.extra or {}).get("topk"):
            return a.extra["topk"]
    return None

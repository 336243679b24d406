"""Task kinds — ``classify``, ``extract``, ``generate`` — and everything that differs between them, in one place.

A stage never asks "is this an extract task?"; it asks the kind what it needs: is the answer a label
(``labelled``), a JSON object (``json``), free text an LLM judge may score (``judged``); how a gold answer
is read, when a teacher answer is unusable, how answers are scored, when two answers agree. The stages
that really differ by kind (generate, train, evaluate) dispatch on ``task.kind`` in their package's
``__init__``; nothing else compares kind names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from protege import metrics as M
from protege.errors import TaskError
from protege.schema import json_schema_reason, parse_json_object


@dataclass(frozen=True)
class Kind:
    name: str
    metric: str          # the primary metric of report.json
    labelled: bool       # the answer is one of task.labels (a classifier student can learn it)
    json: bool = False   # the answer is one JSON object (checked against task.schema)
    judged: bool = False  # free text: an LLM judge may compare answers

    def gold_value(self, value: Any, where: str) -> str:
        """A gold row's answer as text (the label; compact JSON of the object; the reference text)."""
        if self.labelled:
            return str(value)
        if self.json:
            obj = value
            if isinstance(value, str):
                try:
                    obj = json.loads(value)
                except json.JSONDecodeError as e:
                    raise TaskError(f"{where} is not JSON ({e.msg}); a kind: extract gold answer is a JSON object, "
                                    f"or a string holding one") from None
            if not isinstance(obj, dict):
                raise TaskError(f"{where} is a {type(obj).__name__}, not a JSON object; a kind: extract gold answer "
                                f"is an object like {{\"total\": \"12.00\"}}")
            return json.dumps(obj, ensure_ascii=False)
        if not isinstance(value, str) or not value.strip():
            raise TaskError(f"{where} is empty or not text ({type(value).__name__}); a kind: generate gold answer is "
                            f"the reference text")
        return value

    def validity(self, row: dict, labels: Sequence[str] = (), schema: dict | None = None) -> str | None:
        """Why a teacher answer row is unusable for this kind, or None when it is valid."""
        if self.labelled:
            return None if row.get("label") in labels else f"label {row.get('label')!r} not in the label set"
        value = row.get("output", row.get("label"))
        if self.json:
            return json_schema_reason(value, schema)
        return None if isinstance(value, str) and value.strip() else "empty output"

    def score(self, golds: Sequence[Any], preds: Sequence[Any], *, labels: list[str] | None = None,
              schema: dict | None = None) -> tuple[np.ndarray, dict]:
        """(per-item primary scores, metrics incl. the primary and its bootstrap CI)."""
        if self.labelled:
            items, m = M.score_classify(golds, preds, labels or sorted(set(golds)))
        elif self.json:
            items, m = M.score_extract(golds, preds, schema)
        else:
            items, m = M.score_generate(golds, preds)
        m[f"{self.metric}_ci"] = list(M.bootstrap_ci(items))
        return items, m

    def answer_key(self, text: str) -> str:
        """A canonical form of an answer: equal keys = the same answer (votes, agreement)."""
        if self.json:
            obj = parse_json_object(text)
            if obj is not None:
                return json.dumps(M.flatten_fields(obj), sort_keys=True)
        return " ".join(str(text).split())

    def same_answer(self, a: str | None, b: str | None) -> bool:
        """extract: the same fields and values; classify / generate: the same text (whitespace aside)."""
        if a is None or b is None:
            return False
        if self.json and (parse_json_object(a) is None or parse_json_object(b) is None):
            return False
        return self.answer_key(a) == self.answer_key(b)


KINDS = {
    "classify": Kind("classify", "accuracy", labelled=True),
    "extract": Kind("extract", "field_f1", labelled=False, json=True),
    "generate": Kind("generate", "rougeL", labelled=False, judged=True),
}
PRIMARY = {k: v.metric for k, v in KINDS.items()}


def kind(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown task kind {name!r}; expected one of {sorted(KINDS)}") from None


def kind_of(task) -> Kind:
    return kind(task.kind)


def score_items(name: str, golds: Sequence[Any], preds: Sequence[Any], *, labels: list[str] | None = None,
                schema: dict | None = None) -> tuple[np.ndarray, dict]:
    return kind(name).score(golds, preds, labels=labels, schema=schema)


def same_answer(name: str, a: str | None, b: str | None) -> bool:
    return kind(name).same_answer(a, b)

"""The teacher interface, the registry, and the prompt every backend shares.

A teacher turns a batch of *requests* into a batch of :class:`Answer`. A request is a plain JSON-able
dict holding everything that determines the answer (messages, labels, params); its hash is the ledger
key, so two backends never need to agree on anything but this shape.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..task import TaskError, TaskSpec


@dataclass
class Answer:
    """One teacher answer. ``probs`` is over ``task.labels`` (raw, before any calibration)."""

    label: str | None
    probs: list[float] | None = None
    soft: str = "none"  # "logits" (full next-token logits), "logprobs" (API top_logprobs), "hard" (p=1), "none"
    text: str = ""
    missing_mass: float = 0.0  # probability the teacher put outside the label set (API top-k)
    tokens_in: int = 0
    tokens_out: int = 0
    latency_s: float = 0.0
    cost_usd: float = 0.0
    status: str = "ok"
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def local_errors(cls, e: BaseException, n: int) -> list["Answer"]:
        """One error Answer per request of a local batch that raised: a broken batch is recorded per item,
        never dropped."""
        return [cls(label=None, status="error", error=f"{type(e).__name__}: {e}", extra={"reason": "local_error"})
                for _ in range(n)]

    @classmethod
    def from_json(cls, d: dict) -> "Answer":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def answers_from_scores(labels: list[str], scores: np.ndarray, *, tokens_in: Sequence[int], tokens_out: int,
                        latency_s: float, cost_usd: float, index: Sequence[int] | None = None) -> list[Answer]:
    """Answers (soft="logits") from per-row scores [B, C]: the softmax of each row is the label distribution.

    ``index`` maps task labels to columns when the columns are the model's own classes (a seq-cls head):
    those columns are kept and renormalised, the probability of the rest kept as ``missing_mass`` (uniform
    when the kept mass is 0). Without it the columns are ``labels``, in order.
    """
    z = scores - scores.max(1, keepdims=True)
    full = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    out = []
    for p, n_in in zip(full, tokens_in):
        missing = 0.0
        if index is not None:
            q = p[list(index)]
            total = float(q.sum())
            p = q / total if total > 0 else np.full(len(labels), 1.0 / len(labels))
            missing = max(0.0, 1.0 - total)
        k = int(p.argmax())
        out.append(Answer(label=labels[k], probs=[float(x) for x in p], soft="logits", text=labels[k],
                          missing_mass=missing, tokens_in=n_in, tokens_out=tokens_out, latency_s=latency_s,
                          cost_usd=cost_usd))
    return out


class Teacher(ABC):
    """A labelling backend. Subclasses set ``name`` (the ledger's model id) and implement ``answer``."""

    name: str

    def __init__(self, task: TaskSpec):
        self.task = task
        self.cfg = task.teacher

    @abstractmethod
    def request(self, text: str, sample: int = 0) -> dict:
        """The JSON-able request for one input; hashed into the ledger key."""

    @abstractmethod
    def answer(self, requests: list[dict]) -> list[Answer]:
        """Answer a batch of requests. Must return one Answer per request, errors as status='error'."""

    @property
    def display_name(self) -> str:
        """Short human name for tables: the GGUF file / model folder / API model id."""
        ref = self.cfg.gguf_file or self.cfg.model
        return ref.rsplit("/", 1)[-1].removesuffix(".gguf").removeprefix("pkg:")

    def estimate_cost(self, request: dict) -> float:
        """Upper-bound $ of one call, checked against the budget before it is sent."""
        return 0.0

    def close(self) -> None:  # pragma: no cover - trivial
        pass


TEACHERS: dict[str, Callable[[TaskSpec], Teacher]] = {}


def register_teacher(name: str) -> Callable[[type[Teacher]], type[Teacher]]:
    def deco(cls: type[Teacher]) -> type[Teacher]:
        TEACHERS[name] = cls
        return cls

    return deco


def make_teacher(task: TaskSpec) -> Teacher:
    from . import hf, openai  # noqa: F401  (register built-in backends)

    try:
        factory = TEACHERS[task.teacher.backend]
    except KeyError:
        raise TaskError(f"teacher.backend {task.teacher.backend!r} is unknown; use one of {sorted(TEACHERS)}") from None
    return factory(task)


# -- prompt ------------------------------------------------------------------------------------

def system_prompt(task: TaskSpec) -> str:
    """The system turn a model answers the task under: the instruction plus the label list (classify) or
    the JSON schema (extract)."""
    if getattr(task, "kind", "classify") != "classify":
        from ..textgen import system_text

        return system_text(task)
    return f"{task.instruction.strip()}\nAnswer with exactly one of: {', '.join(task.labels)}."


def assistant_text(task: TaskSpec, label: str) -> str:
    p = task.teacher.answer_prefix
    return f"{p} {label}" if p else label


def build_messages(task: TaskSpec, text: str) -> list[dict]:
    """System instruction, the task's worked examples as chat turns, then the input."""
    msgs = [{"role": "system", "content": system_prompt(task)}]
    for ex in task.examples:
        msgs += [{"role": "user", "content": ex.input}, {"role": "assistant", "content": assistant_text(task, ex.output)}]
    msgs.append({"role": "user", "content": text})
    return msgs


def truncate_words(text: str, max_tokens: int) -> str:
    """Cheap tokenizer-free truncation (~0.75 words per token) for API teachers."""
    words = text.split()
    limit = max(1, int(max_tokens * 0.75))
    return " ".join(words[:limit]) if len(words) > limit else text.strip()


_PUNCT = re.compile(r"^[\s\"'`*_.:;,()\[\]-]+|[\s\"'`*_.:;,()\[\]!-]+$")


def parse_label(text: str, labels: list[str], answer_prefix: str = "") -> str | None:
    """Map a free-text answer onto the label set; None when it is not one of the labels."""
    t = text.strip()
    if answer_prefix and t.lower().startswith(answer_prefix.lower()):
        t = t[len(answer_prefix):]
    t = _PUNCT.sub("", t).lower()
    by_lower = {lab.lower(): lab for lab in labels}
    if t in by_lower:
        return by_lower[t]
    # "sports." / "sports\n\nThe article..." → first word-ish run that is a label
    for lab_l, lab in sorted(by_lower.items(), key=lambda kv: -len(kv[0])):
        if t.startswith(lab_l) and (len(t) == len(lab_l) or not t[len(lab_l)].isalnum()):
            return lab
    return None

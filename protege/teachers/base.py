"""The teacher interface: what a backend is asked (a request) and what it gives back (an :class:`Answer`).

A teacher turns a batch of *requests* into a batch of :class:`Answer`. A request is a plain JSON-able
dict holding everything that determines the answer (messages, labels, params); its hash is the ledger
key, so two backends never need to agree on anything but this shape.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from protege.task import TaskSpec
from protege.teachers.prompts import preclip, truncate_words


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
    # what this backend can do (protege.registry.Capabilities): read by callers instead of backend names
    local: bool = False
    logits: bool = False
    logprobs: bool = True
    generation: bool = True
    concurrent: bool = False

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

    def truncated(self, text: str) -> bool:
        """Is ``text`` cut to ``max_input_tokens`` in this teacher's requests? By the teacher's tokenizer
        (``self.tok``) when it has one, else by the API character budget (:func:`truncate_words`)."""
        n = self.cfg.max_input_tokens
        tok = getattr(self, "tok", None)
        if tok is None:
            return truncate_words(text, n) != text.strip()
        return len(tok(preclip(text, n).strip(), add_special_tokens=False).input_ids) > n

    def close(self) -> None:  # pragma: no cover - trivial
        pass

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
    """Tokenizer-free truncation for API teachers: the first ~0.75 words per token, then a character budget
    (:func:`clip_chars`), so a line without spaces or a CJK text is cut too. Whatever the input, the result
    holds at most ~``max_tokens`` estimated tokens (:func:`estimate_text_tokens`)."""
    text = text[: _PRECLIP_CHARS_PER_TOKEN * max_tokens]  # a 50 MB line is never split or scanned whole
    words = text.split()
    limit = max(1, int(max_tokens * 0.75))
    return clip_chars(" ".join(words[:limit]) if len(words) > limit else text.strip(), max_tokens)


# The character budget of API teachers (no tokenizer on this side). Tokens per non-space character, by
# kind of character: ASCII 0.2 (5 letters per token: on English the word rule above binds first — no BBC
# article's cut moves, so existing ledgers keep their keys; a space-less ASCII line such as hex or base64,
# ~3 characters per token, may cost up to ~1.7x max_input_tokens), other alphabetic scripts below U+3000
# (accented Latin, Greek, Cyrillic, Hebrew, Arabic) 0.5, and everything else — CJK, kana, Hangul, Thai,
# Indic scripts, emoji — 1 token per character (o200k / Claude / Gemini spend about that on CJK).
# So max_input_tokens 256 keeps 1,280 characters of a space-less ASCII line and 256 of a Japanese text.
# The budget gate does not rely on this: its price estimate (OpenAITeacher.estimate_tokens) counts every
# character at 3 per token or this estimate, whichever is more, and learns the real ratio from usage.
ASCII_TOKENS_PER_CHAR = 0.2
ALPHABETIC_TOKENS_PER_CHAR = 0.5
OTHER_TOKENS_PER_CHAR = 1.0
_PRECLIP_CHARS_PER_TOKEN = 64  # no tokenizer spends one token on more characters than this on real text


def _char_tokens(c: str) -> float:
    o = ord(c)
    if o < 128:
        return 0.0 if c.isspace() else ASCII_TOKENS_PER_CHAR
    if c.isspace():
        return 0.0
    return ALPHABETIC_TOKENS_PER_CHAR if o < 0x3000 else OTHER_TOKENS_PER_CHAR


def estimate_text_tokens(text: str) -> float:
    """Tokens ``text`` would cost under the character budget (an over-estimate on natural text)."""
    if text.isascii():
        return ASCII_TOKENS_PER_CHAR * len("".join(text.split()))
    return sum(map(_char_tokens, text))


def clip_chars(text: str, max_tokens: int) -> str:
    """``text`` cut where its estimated tokens would pass ``max_tokens`` (unchanged when it fits)."""
    if len(text) * ASCII_TOKENS_PER_CHAR <= max_tokens or estimate_text_tokens(text) <= max_tokens:
        return text
    used = 0.0
    for j, c in enumerate(text):
        used += _char_tokens(c)
        if used > max_tokens:
            return text[:j].rstrip()
    return text


def preclip(text: str, max_tokens: int) -> str:
    """A prefix long enough for any tokenizer to fill ``max_tokens`` (local teachers tokenize this, not a
    50 MB line)."""
    return text[: _PRECLIP_CHARS_PER_TOKEN * max_tokens]


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

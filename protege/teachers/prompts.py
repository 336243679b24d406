"""The prompt every backend shares: the system turn, worked examples as chat turns, input truncation, and
reading a label back out of free text.

Teacher and student are told the same instruction: the teacher with the task's worked examples, the
student (which learns the task from data) without them.
"""

from __future__ import annotations

import json
import re

from protege.kinds import kind_of
from protege.task import TaskSpec


def system_text(task: TaskSpec) -> str:
    """The instruction, plus the schema for extraction: what teacher and student are both told."""
    s = task.instruction.strip()
    if kind_of(task).json and task.schema_:
        s += ("\nReply with one JSON object that follows this JSON schema, and nothing else:\n"
              + json.dumps(task.schema_, ensure_ascii=False))
    return s


def teacher_messages(task: TaskSpec, text: str) -> list[dict]:
    """System instruction, the worked examples as chat turns, then the input."""
    msgs = [{"role": "system", "content": system_text(task)}]
    for ex in task.examples:
        msgs += [{"role": "user", "content": ex.input}, {"role": "assistant", "content": ex.output}]
    return msgs + [{"role": "user", "content": text}]


def system_prompt(task: TaskSpec) -> str:
    """The system turn a model answers the task under: the instruction plus the label list (classify) or
    the JSON schema (extract)."""
    if not kind_of(task).labelled:
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

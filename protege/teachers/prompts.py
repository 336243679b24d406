"""The prompt every backend shares: the system turn, worked examples as chat turns, input truncation, and
reading a label back out of free text.

Teacher and student are told the same instruction: the teacher with the task's worked examples, the
student (which learns the task from data) without them.
"""

from __future__ import annotations

import json
import re

from protege.task import TaskSpec


def system_text(task: TaskSpec) -> str:
    """The instruction, plus the schema for extraction: what teacher and student are both told."""
    s = task.instruction.strip()
    if task.kind == "extract" and task.schema_:
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
    if task.kind != "classify":
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

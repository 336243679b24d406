"""``--format jsonl``: the curated data as OpenAI-style chat fine-tuning JSONL (for managed fine-tuning services)."""

from __future__ import annotations

import json
from pathlib import Path

from protege.kinds import kind_of
from protege.artifacts import atomic_dir
from protege.data import read_jsonl, write_json, write_jsonl
from protege.export.common import metadata_light


def chat_rows(rows: list[dict], system: str) -> list[dict]:
    return [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": r["text"]},
                          {"role": "assistant", "content": r["label"]}]} for r in rows]


def check_chat_jsonl(path: Path) -> int:
    """Validate an OpenAI chat fine-tuning file: one object per line, system/user/assistant turns, text."""
    n = 0
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        obj = json.loads(line)
        msgs = obj.get("messages")
        if not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "assistant":
            raise ValueError(f"{path}: line {i}: needs a messages list ending with an assistant turn")
        for m in msgs:
            if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str) \
                    or not m["content"].strip():
                raise ValueError(f"{path}: line {i}: bad message {m!r}")
        n += 1
    return n


def export_jsonl(run: Path, dest: Path, task) -> dict:
    """Curated rows as chat fine-tuning JSONL, split the way train splits them (teacher-labelled dev)."""
    if task is None:
        raise ValueError("jsonl export needs the task file (its instruction is the system prompt): pass --task")
    from protege.stages.train import dev_split, text_dev_split
    from protege.teachers.prompts import system_prompt

    rows = read_jsonl(Path(run) / "curate" / "train.jsonl") if (Path(run) / "curate" / "train.jsonl").is_file() else None
    if not rows:
        raise FileNotFoundError(f"{Path(run) / 'curate' / 'train.jsonl'} not found or empty; run `protege curate` first")
    if kind_of(task).labelled:
        tr, dv = dev_split([r["label"] for r in rows], task.train.dev_fraction, task.train.seed)
    else:  # text rows carry their answer as `label` too; the same split the train stage uses
        tr, dv = text_dev_split(len(rows), task.train.dev_fraction, task.train.seed)
    system = system_prompt(task)
    with atomic_dir(dest) as tmp:
        write_jsonl(tmp / "train.jsonl", chat_rows([rows[i] for i in tr], system))
        write_jsonl(tmp / "validation.jsonl", chat_rows([rows[i] for i in dv], system))
        n_train, n_val = check_chat_jsonl(tmp / "train.jsonl"), check_chat_jsonl(tmp / "validation.jsonl")
        meta = {**metadata_light(task), "n_train": n_train, "n_validation": n_val,
                "sources": {s: sum(r.get("source", "teacher") == s for r in rows) for s in ("teacher", "real", "review")}}
        write_json(tmp / "protege.json", meta)
    notes = [] if n_train >= 10 else ["OpenAI fine-tuning needs at least 10 training examples"]
    return {"format": "jsonl", "path": str(dest), "n_train": n_train, "n_validation": n_val, "notes": notes}

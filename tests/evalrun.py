"""A finished tiny run folder for evaluate / report / compare tests, built without a teacher or training.

The student is a real :class:`StaticClassifier` (saved and re-loaded) whose embeddings and head are set
by hand, so its predictions are known: it answers the colour whose cue word is in the text, unless
the text holds the word "decoy", which pushes it to ``decoy_label``. The teacher's answers are
written into ``generate/gold.jsonl`` directly, so teacher and student accuracy are hand-computable.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from tiny import wordlevel_tokenizer

LABELS = ["red", "green", "blue"]
CUE = {"red": "cherry", "green": "grass", "blue": "ocean"}


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_student(decoy_label: str | None = "blue", strength: float = 4.0):
    """decoy_label=None: a student that ignores the decoy word (right on every item)."""
    from protege.students.classifier import StaticClassifier

    words = list(CUE.values()) + ["decoy", "the", "item", "number"] + [str(i) for i in range(100)]
    tok = wordlevel_tokenizer(words)
    dims = 4
    emb = np.zeros((tok.get_vocab_size(), dims), dtype=np.float32)
    vocab = tok.get_vocab()
    for j, lab in enumerate(LABELS):
        emb[vocab[CUE[lab]], j] = 1.0
    emb[vocab["decoy"], 3] = 2.0
    for w in ["the", "item", "number"] + [str(i) for i in range(100)]:
        emb[vocab[w]] = 0.01
    m = StaticClassifier(emb, tok, LABELS)
    W = np.zeros((dims, len(LABELS)), dtype=np.float32)
    W[:3, :3] = np.eye(3) * strength
    if decoy_label is not None:
        W[3, LABELS.index(decoy_label)] = strength * 2
    m.W, m.b = W, np.zeros(len(LABELS), dtype=np.float32)
    return m


def gold_rows(n: int = 30) -> list[dict]:
    """Balanced gold items; every 5th one carries the decoy word (the student gets those wrong unless the
    decoy label happens to be the gold one)."""
    rows = []
    for i in range(n):
        lab = LABELS[i % 3]
        extra = " decoy" if i % 5 == 4 else ""
        rows.append({"text": f"the {CUE[lab]} item number {i}{extra}", "label": lab})
    return rows


def teacher_labels(gold: list[dict], wrong_every: int = 6) -> list[str]:
    """The teacher is right except on every ``wrong_every``-th item, where it says the next label."""
    out = []
    for i, r in enumerate(gold):
        lab = r["label"]
        out.append(LABELS[(LABELS.index(lab) + 1) % 3] if i % wrong_every == wrong_every - 1 else lab)
    return out


def make_run(root: Path, *, decoy_label: str | None = "blue", n: int = 30, wrong_every: int = 6, api_teacher: bool = False) -> Path:
    """Write task/, generate/, curate/, train/ into ``root``; return the task.yaml path."""
    from protege.data import text_key

    root = Path(root)
    gold = gold_rows(n)
    _jsonl(root / "task" / "gold.jsonl", gold)
    _jsonl(root / "task" / "inputs.jsonl", [{"text": f"the {CUE[LABELS[i % 3]]} item"} for i in range(6)])
    task = {"name": "tiny-eval", "kind": "classify", "instruction": "Which colour?", "labels": LABELS,
            "data": {"inputs": "inputs.jsonl", "gold": "gold.jsonl"},
            "teacher": {"backend": "openai", "model": "gpt-4o-mini"} if api_teacher else
            {"backend": "hf", "model": "some/local-model", "usd_per_hour": 0.5},
            "student": {"usd_per_hour": 0.1}, "volume_per_month": 100_000}
    (root / "task" / "task.yaml").write_text(yaml.safe_dump(task, sort_keys=False), encoding="utf-8")
    t_lab = teacher_labels(gold, wrong_every)
    rows = []
    for r, lab in zip(gold, t_lab):
        probs = [0.8 if x == lab else 0.1 for x in LABELS]
        rows.append({"id": text_key(r["text"]), "label": lab, "probs": probs, "confidence": 0.8, "status": "ok",
                     "soft": "logits"})
    _jsonl(root / "generate" / "gold.jsonl", rows)
    (root / "generate" / "config.json").write_text(json.dumps({"stage": "generate", "fingerprint": "gen-fp"}))
    timing = ({"single_s_p50": 0.55, "batched_s_per_item": 0.55, "source": "ledger latency per call"} if api_teacher else
              {"single_s": [0.20, 0.21, 0.19, 0.30], "single_s_p50": 0.205, "batched_s_per_item": 0.05, "source": "measured"})
    stats = {"n_inputs": 6, "inputs": {"usd": 0.5}, "teacher": "tiny-teacher", "teacher_id": "tiny-teacher",
             "timing": timing}
    (root / "generate" / "stats.json").write_text(json.dumps(stats))
    (root / "curate").mkdir(exist_ok=True)
    (root / "curate" / "stats.json").write_text(json.dumps({"n_in": 6, "n_kept": 6, "dropped": {}}))
    (root / "curate" / "config.json").write_text(json.dumps({"stage": "curate", "fingerprint": "cur-fp"}))
    student = make_student(decoy_label)
    student.save_pretrained(root / "train" / "student")
    (root / "train" / "stats.json").write_text(json.dumps({"n_train": 6, "train_seconds": 2.0}))
    (root / "train" / "config.json").write_text(json.dumps({"stage": "train", "fingerprint": f"train-{decoy_label}"}))
    if api_teacher:
        from protege.teachers.ledger import Ledger

        with Ledger(root / "ledger.sqlite") as led:
            for i, s in enumerate((0.4, 0.5, 0.6, 0.7)):
                led.record(f"k{i}", model="tiny-teacher", stage="gold", request={"i": i}, response={}, cost_usd=0.002,
                           latency_s=s)
            # a judge call of the same model: neither its latency nor its price is a labelling call's
            led.record("j0", model="tiny-teacher", stage="judge", request={"j": 0}, response={}, cost_usd=1.0,
                       latency_s=9.0)
    return root / "task" / "task.yaml"


def expected_accuracy(decoy_label: str | None = "blue", n: int = 30, wrong_every: int = 6) -> tuple[float, float]:
    """(teacher, student) accuracy on gold_rows(n), computed the slow obvious way."""
    gold = gold_rows(n)
    t = teacher_labels(gold, wrong_every)
    s = [decoy_label if decoy_label and "decoy" in r["text"] else r["label"] for r in gold]
    return (float(np.mean([a == r["label"] for a, r in zip(t, gold)])),
            float(np.mean([a == r["label"] for a, r in zip(s, gold)])))

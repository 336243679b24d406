"""Stage 3: keep the teacher labels worth learning from.

A student copies its teacher's mistakes, so what the teacher could not answer, answered outside the
label set, or answered with low confidence is dropped before training. Every drop is counted by
reason in ``stats.json`` so the effect of each threshold is visible.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .artifacts import fingerprint, is_fresh, read_config, require, stage_writer
from .data import load_real_train, read_jsonl, write_json, write_jsonl
from .task import TaskSpec


def curate_rows(rows: list[dict], labels: list[str], min_confidence: float) -> tuple[list[dict], Counter]:
    """Pure filter: (kept rows, Counter of drop reasons)."""
    kept, dropped = [], Counter()
    for r in rows:
        if r.get("status") != "ok":
            dropped["teacher_failed"] += 1
        elif r.get("label") not in labels:
            dropped["invalid_label"] += 1
        elif float(r.get("confidence") or 0.0) < min_confidence:
            dropped["low_confidence"] += 1
        else:
            kept.append(r)
    return kept, dropped


def curate(task: TaskSpec, out: Path, *, force: bool = False) -> Path:
    gen_dir, stage_dir = Path(out) / "generate", Path(out) / "curate"
    gen_cfg = require(gen_dir, "generate")
    fp = fingerprint({"upstream": gen_cfg["fingerprint"], "curate": task.curate.model_dump(),
                      "labels": task.labels, "train": task.data.train})
    if not force and is_fresh(stage_dir, fp):
        return stage_dir
    rows = read_jsonl(gen_dir / "train.jsonl")
    kept, dropped = curate_rows(rows, task.labels, task.curate.min_confidence)
    for r in kept:
        r["source"] = "teacher"
    real = [{**r, "probs": [float(lab == r["label"]) for lab in task.labels], "confidence": 1.0, "source": "real",
             "status": "ok"} for r in load_real_train(task)]
    stats = {"n_in": len(rows), "n_kept": len(kept), "dropped": dict(dropped), "n_real": len(real),
             "label_counts": dict(Counter(r["label"] for r in kept + real))}
    with stage_writer(stage_dir, {"stage": "curate", "fingerprint": fp, "task": task.name}) as tmp:
        write_jsonl(tmp / "train.jsonl", kept + real)
        write_json(tmp / "stats.json", stats)
    return stage_dir


def curate_stats(out: Path) -> dict | None:
    cfg = read_config(Path(out) / "curate")
    if cfg is None:
        return None
    import json

    return json.loads((Path(out) / "curate" / "stats.json").read_text(encoding="utf-8"))

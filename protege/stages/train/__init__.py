"""Stage 4: train the student on curated teacher labels.

The dev split used for early stopping is carved from the *teacher-labelled* data (stratified by the
teacher's label, fixed seed); gold items never reach this stage — ``load_inputs`` already removed any
input that is also in gold.
"""

from __future__ import annotations

from pathlib import Path

from protege.artifacts import is_fresh, require, stage_writer
from protege.data import read_jsonl, write_json
from protege.stages.keys import TRAIN
from protege.stages.train.classify import train_classify
from protege.stages.train.common import balanced_class_weights, dev_split, text_dev_split, too_few_rows_message
from protege.stages.train.text import train_text
from protege.task import TaskSpec

BY_KIND = {"classify": train_classify, "extract": train_text, "generate": train_text}

__all__ = ["train", "dev_split", "text_dev_split", "balanced_class_weights"]


def train(task: TaskSpec, out: Path, *, force: bool = False) -> Path:
    """Train the task's student on ``out/curate/train.jsonl`` into ``out/train/`` (skipped when up to date)."""
    cur_dir, stage_dir = Path(out) / "curate", Path(out) / "train"
    cur_cfg = require(cur_dir, "curate")
    fp = TRAIN.key(task, upstream=cur_cfg["fingerprint"])
    if not force and is_fresh(stage_dir, fp):
        return stage_dir
    rows = read_jsonl(cur_dir / "train.jsonl")
    if len(rows) < 2:
        raise ValueError(too_few_rows_message(task, cur_dir, len(rows)))
    student, stats = BY_KIND[task.kind](task, Path(out), rows)
    return _write_train(task, stage_dir, fp, student, stats)


def _write_train(task: TaskSpec, stage_dir: Path, fp: str, student, stats: dict) -> Path:
    from protege.students.distributed import is_main_process, wait_for_everyone

    if is_main_process():  # under `accelerate launch` every rank trains; rank 0 writes the artifact
        with stage_writer(stage_dir, {"stage": "train", "fingerprint": fp, "task": task.name}) as tmp:
            student.save_pretrained(tmp / "student")
            for name, rung in (getattr(student, "ladder_students", None) or {}).items():  # student.kind: auto
                rung.save_pretrained(tmp / "ladder" / name)
            cal = getattr(student, "calibration", None)
            if cal is not None:  # out-of-fold (probs, teacher label) per curated row, in train.jsonl's order
                import numpy as np

                np.savez(tmp / "calibration.npz", probs=cal["probs"], teacher=cal["teacher"], rung=cal["rung"])
                for rung, probs in (cal.get("by_rung") or {}).items():  # the other rungs: cascade levels
                    (tmp / "calibration").mkdir(exist_ok=True)
                    np.savez(tmp / "calibration" / f"{rung}.npz", probs=probs, teacher=cal["teacher"], rung=rung)
            write_json(tmp / "stats.json", stats)
            write_json(tmp / "history.json", getattr(student, "history", []))
    wait_for_everyone()
    return stage_dir



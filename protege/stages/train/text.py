"""Train an extract / generate student: a causal LM on (input, teacher answer), SFT + token KD."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from protege.stages.train.common import sources, text_dev_split, weights_by_source
from protege.stages.train.neural import fit_text_student
from protege.task import TaskSpec
from protege.kinds import kind_of


def train_text(task: TaskSpec, out: Path, rows: list[dict]) -> tuple[object, dict]:
    """extract / generate: a causal-LM student on (input, teacher output), SFT + token KD from stored top-k.

    A dev split (``train.dev_fraction``, at most 32 items, seeded) is held out of training; the trained
    student answers it and its agreement with the teacher's answers is reported.
    """
    topk_file = out / "generate" / "topk.safetensors"
    stored = None
    if topk_file.is_file() and any(r.get("topk_row") is not None for r in rows):
        from protege.teachers.topk_store import load_topk

        stored = load_topk(topk_file)
    topk = [stored[r["topk_row"]] if stored is not None and r.get("topk_row") is not None else None for r in rows]
    tr, dv = text_dev_split(len(rows), task.train.dev_fraction, task.train.seed)
    t0 = time.perf_counter()
    weight = [float(rows[i].get("weight", 1.0)) for i in tr]  # curate.real_weight on real labelled rows
    student, kd = fit_text_student(task, [rows[i]["text"] for i in tr], [rows[i]["output"] for i in tr],
                                   [topk[i] for i in tr] if stored is not None else None,
                                   sample_weight=weight if any(w != 1.0 for w in weight) else None)
    seconds = time.perf_counter() - t0
    dev_agreement = None
    if dv:
        pred = student.predict([rows[i]["text"] for i in dv])
        dev_agreement = float(np.mean([kind_of(task).same_answer(p, rows[i]["output"]) for p, i in zip(pred, dv)]))
    stats = {"n_train": len(tr), "n_dev": len(dv), "dev_agreement_with_teacher": dev_agreement,
             "train_seconds": seconds, "params": student.n_params, "kd": kd,
             "with_topk": int(sum(topk[i] is not None for i in tr)), "dropped_rows": getattr(student, "data_stats", None),
             **sources(rows, tr), "weights": weights_by_source(rows)}
    return student, stats

"""Train stage for ``student.kind: auto`` (classify): the student ladder (:mod:`protege.students.ladder`).

Reads the curated teacher rows and, for the static-distilled rung, the task's whole unlabelled pool
(``data.inputs`` without ``data.limit``, gold inputs removed; no teacher calls). Writes, through the stage
writer: ``train/student/`` = the chosen rung (a normal student folder), ``train/ladder/<rung>/`` = every trained
rung refitted on all rows, and ``ladder`` / ``learning_curve`` in ``train/stats.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from protege.stages.train.common import sources, weights_by_source
from protege.students.ladder import build_rungs, run_ladder
from protege.students.rungs import Data
from protege.task import TaskSpec


def unlabelled_pool(task: TaskSpec) -> list[str]:
    """Every distinct input of ``data.inputs`` that is not a gold input (``data.limit`` not applied)."""
    from protege.data import input_pool

    try:
        rows, _ = input_pool(task)
    except Exception:  # noqa: BLE001 - the inputs file may have moved since generate: the ladder runs without it
        return []
    return [r["text"] for r in rows]


def train_auto(task: TaskSpec, out: Path, rows: list[dict]) -> tuple[object, dict]:
    from protege.progress import QUIET

    labels = task.labels
    d = Data(texts=[r["text"] for r in rows], P=np.array([r["probs"] for r in rows], dtype=np.float32),
             hard=np.array([labels.index(r["label"]) for r in rows]),
             weight=np.array([float(r.get("weight", 1.0)) for r in rows], dtype=np.float32), labels=list(labels),
             pool=unlabelled_pool(task) if "static-distilled" in task.student.rungs else [],
             alpha=task.train.alpha, temperature=task.train.temperature, max_iter=task.train.max_iter,
             seed=task.train.seed)
    log = (lambda s: None) if QUIET.get("on") else (lambda s: print(s, flush=True))
    t0 = time.perf_counter()
    ray = None
    if task.student.engine == "ray":  # the independent rungs train at once on a Ray cluster
        from protege.parallel import connect

        ray = connect()
    winner, students, ladder, curve = run_ladder(d, build_rungs(task, d), max_ms=task.student.max_ms,
                                                 cv_folds=task.student.cv_folds, log=log, ray=ray,
                                                 time_budget_s=task.student.time_budget_s)
    chosen = next(r for r in ladder["rungs"] if r["name"] == ladder["chosen"])
    winner.ladder_students = students  # saved to train/ladder/<rung>/ by the stage writer
    stats = {"n_train": len(rows), "n_dev": 0, "dev_agreement_with_teacher": chosen["cv_agreement"],
             "dev_agreement_source": f"{ladder['folds']}-fold CV of the chosen rung", "student_kind": ladder["chosen"],
             "temperature": getattr(winner, "temperature", None), "train_seconds": time.perf_counter() - t0,
             "epochs_run": 0, "params": getattr(winner, "n_params", None), "n_pool": len(d.pool),
             **sources(rows, range(len(rows))), "weights": weights_by_source(rows),
             "ladder": ladder, "learning_curve": curve}
    return winner, stats

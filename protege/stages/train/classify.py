"""Train a classify student: the static student (convex fit + temperature), a neural one (encoder / causal LM
through the transformers Trainer), or one a package registers (``fit`` / ``predict_proba`` / ``save_pretrained``)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from protege import metrics as M
from protege.registry import student_class
from protege.stages.train.common import agreement, balanced_class_weights, dev_split, sources, weights_by_source
from protege.students.classifier import StaticClassifier
from protege.task import TaskSpec


def fit_static(task: TaskSpec, texts: list[str], P: np.ndarray, hard: np.ndarray, weight: np.ndarray,
                idf_texts: list[str]) -> StaticClassifier:
    s, t = task.student, task.train
    from protege.students.ngrams import preferred_analyzer

    student = StaticClassifier.from_encoder(s.embedder, task.labels, s.dims, ngrams=s.ngrams,
                                            ngram_min_df=s.ngram_min_df,
                                            ngram_analyzer=preferred_analyzer(texts, s.ngram_analyzer))
    return student.fit(texts, P, hard_labels=hard, sample_weight=weight if np.any(weight != 1.0) else None,
                       alpha=t.alpha, temperature=t.temperature, c=t.c, dense_weight=s.dense_weight,
                       max_iter=t.max_iter, seed=t.seed, class_weights=balanced_class_weights(hard, len(task.labels)),
                       idf_texts=idf_texts)


def train_classify(task: TaskSpec, out: Path, rows: list[dict]) -> tuple[object, dict]:
    """The trained student and its stats: dev agreement with the teacher, temperature, sizes, timings."""
    if task.student.kind == "auto":  # the ladder: its own folds instead of one dev split
        from protege.stages.train.auto import train_auto

        return train_auto(task, out, rows)
    labels = task.labels
    texts = [r["text"] for r in rows]
    P = np.array([r["probs"] for r in rows], dtype=np.float32)
    hard = np.array([labels.index(r["label"]) for r in rows])
    # real labelled rows (data.train, review corrections) carry curate.real_weight; teacher rows 1.0
    weight = np.array([float(r.get("weight", 1.0)) for r in rows], dtype=np.float32)
    tr, dv = dev_split([r["label"] for r in rows], task.train.dev_fraction, task.train.seed)
    class_w = balanced_class_weights(hard[tr], len(labels))
    t0 = time.perf_counter()
    dev_agreement = None
    fit_idx = tr
    if task.student.kind == "static":
        # convex fit: fit on the train split to measure dev agreement, then refit on every row — nothing is
        # early-stopped on dev, so keeping it out of the final model would only throw teacher labels away
        student = fit_static(task, [texts[i] for i in tr], P[tr], hard[tr], weight[tr], texts)
        if len(dv):
            dev_texts = [texts[i] for i in dv]
            dev_agreement = agreement(student, dev_texts, [rows[i]["label"] for i in dv])
            # L2 and tempered soft targets leave the head under-confident (demo: mean confidence 0.69 at 0.94
            # accuracy); one temperature fitted on the held-out dev split against the teacher's labels
            # makes its confidence mean "chance the teacher would agree" — what a cascade threshold needs
            temperature = M.fit_temperature(student.decision_function(dev_texts), hard[dv])
            fit_idx = np.arange(len(rows))
            student = fit_static(task, texts, P, hard, weight, texts).scale_logits(temperature)
    elif task.student.kind in ("encoder", "causal_lm"):  # transformers / TRL trainers, `accelerate launch`-ready
        from protege.stages.train.neural import fit_student

        student = fit_student(task, [texts[i] for i in tr], P[tr], hard[tr],
                              sample_weight=weight[tr] if np.any(weight != 1.0) else None,
                              dev=([texts[i] for i in dv], P[dv]) if len(dv) else None, class_weights=class_w)
    else:  # a student kind a package registered (entry point group protege.students)
        student = student_class(task.student.kind).from_task(task).fit(
            [texts[i] for i in tr], P[tr], hard_labels=hard[tr],
            sample_weight=weight[tr] if np.any(weight != 1.0) else None)
    if len(dv) and dev_agreement is None:
        dev_agreement = agreement(student, [texts[i] for i in dv], [rows[i]["label"] for i in dv])
    seconds = time.perf_counter() - t0
    stats = {"n_train": int(len(fit_idx)), "n_dev": int(len(dv)), "dev_agreement_with_teacher": dev_agreement,
             "temperature": getattr(student, "temperature", None),
             "train_seconds": seconds, "epochs_run": len(getattr(student, "history", [])),
             "params": getattr(student, "n_params", None), **sources(rows, fit_idx), "weights": weights_by_source(rows)}
    return student, stats

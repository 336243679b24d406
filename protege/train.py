"""Stage 4: train the student on curated teacher labels.

The dev split used for early stopping is carved from the *teacher-labelled* data (stratified by the
teacher's label, fixed seed); gold items never reach this stage — ``load_inputs`` already removed any
input that is also in gold.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .artifacts import fingerprint, is_fresh, require, stage_writer
from .data import read_jsonl, write_json
from .students.classifier import StaticClassifier
from .task import TaskSpec


def dev_split(labels: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train_idx, dev_idx); every label with ≥2 items gets at least one dev item."""
    rng = np.random.default_rng(seed)
    train_idx, dev_idx = [], []
    for lab in sorted(set(labels)):
        idx = np.array([i for i, x in enumerate(labels) if x == lab])
        rng.shuffle(idx)
        k = int(round(len(idx) * fraction)) if len(idx) > 1 else 0
        k = max(k, 1) if len(idx) > 1 else 0
        dev_idx += idx[:k].tolist()
        train_idx += idx[k:].tolist()
    return np.array(sorted(train_idx)), np.array(sorted(dev_idx))


def train(task: TaskSpec, out: Path, *, force: bool = False) -> Path:
    cur_dir, stage_dir = Path(out) / "curate", Path(out) / "train"
    cur_cfg = require(cur_dir, "curate")
    fp = fingerprint({"upstream": cur_cfg["fingerprint"], "student": task.student.model_dump(),
                      "train": task.train.model_dump()})
    if not force and is_fresh(stage_dir, fp):
        return stage_dir
    rows = read_jsonl(cur_dir / "train.jsonl")
    if len(rows) < 2:
        raise ValueError(f"{cur_dir / 'train.jsonl'} has {len(rows)} usable items; need at least 2 — lower "
                         f"curate.min_confidence or label more inputs")
    labels = task.labels
    texts = [r["text"] for r in rows]
    P = np.array([r["probs"] for r in rows], dtype=np.float32)
    hard = np.array([labels.index(r["label"]) for r in rows])
    # real labelled rows (data.train, review corrections) carry curate.real_weight; teacher rows 1.0
    weight = np.array([float(r.get("weight", 1.0)) for r in rows], dtype=np.float32)
    tr, dv = dev_split([r["label"] for r in rows], task.train.dev_fraction, task.train.seed)
    counts = np.bincount(hard[tr], minlength=len(labels)).astype(np.float32)
    class_w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(labels), 0.0)
    t0 = time.perf_counter()
    cfg = task.train
    if task.student.kind == "static":
        student = StaticClassifier.from_encoder(task.student.embedder, labels, task.student.dims)
        student.fit([texts[i] for i in tr], P[tr], hard_labels=hard[tr],
                    sample_weight=weight[tr] if np.any(weight != 1.0) else None,
                    dev=([texts[i] for i in dv], P[dv]) if len(dv) else None,
                    alpha=cfg.alpha, temperature=cfg.temperature, epochs=cfg.epochs, lr=cfg.lr,
                    weight_decay=cfg.weight_decay, patience=cfg.patience, seed=cfg.seed, class_weights=class_w,
                    idf_texts=texts)
    else:  # encoder / causal_lm: transformers / TRL trainers, `accelerate launch`-ready (protege.students)
        from .students import fit_student

        student = fit_student(task, [texts[i] for i in tr], P[tr], hard[tr],
                              sample_weight=weight[tr] if np.any(weight != 1.0) else None,
                              dev=([texts[i] for i in dv], P[dv]) if len(dv) else None, class_weights=class_w)
    seconds = time.perf_counter() - t0
    dev_agreement = None
    if len(dv):
        pred = student.predict([texts[i] for i in dv])
        dev_agreement = float(np.mean([p == rows[i]["label"] for p, i in zip(pred, dv)]))
    stats = {"n_train": int(len(tr)), "n_dev": int(len(dv)), "dev_agreement_with_teacher": dev_agreement,
             "train_seconds": seconds, "epochs_run": len(student.history), "params": student.n_params,
             "sources": {s: sum(r.get("source", "teacher") == s for r in rows) for s in ("teacher", "real", "review")},
             "sources_in_fit": {s: int(sum(rows[i].get("source", "teacher") == s for i in tr))
                                for s in ("teacher", "real", "review")},
             "weights": {s: sorted({float(r.get("weight", 1.0)) for r in rows if r.get("source", "teacher") == s})
                         for s in ("teacher", "real", "review")}}
    from .students import is_main_process, wait_for_everyone

    if is_main_process():  # under `accelerate launch` every rank trains; rank 0 writes the artifact
        with stage_writer(stage_dir, {"stage": "train", "fingerprint": fp, "task": task.name}) as tmp:
            student.save_pretrained(tmp / "student")
            write_json(tmp / "stats.json", stats)
            write_json(tmp / "history.json", student.history)
    wait_for_everyone()
    return stage_dir

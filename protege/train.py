"""Stage 4: train the student on curated teacher labels.

The dev split used for early stopping is carved from the *teacher-labelled* data (stratified by the
teacher's label, fixed seed); gold items never reach this stage — ``load_inputs`` already removed any
input that is also in gold.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import metrics as M
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


# Bumped when how a student is trained changes (not just its settings), so an existing run folder's train
# stage is redone instead of looking fresh. 2: static student with n-gram block, convex fit, temperature.
TRAIN_RECIPE = 2


def text_dev_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, dev) indices for extract / generate rows: a seeded random ``fraction``, at most 32 items
    (each dev item costs a full generation to score), none below 10 rows."""
    n_dev = min(32, int(round(n * fraction))) if n >= 10 else 0
    order = np.random.default_rng(seed).permutation(n)
    return sorted(order[n_dev:].tolist()), sorted(order[:n_dev].tolist())


def balanced_class_weights(hard: np.ndarray, k: int) -> np.ndarray:
    """scikit-learn's ``class_weight="balanced"``: n / (k · count); 0 for a label with no rows."""
    counts = np.bincount(hard, minlength=k).astype(np.float32)
    return np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / k, 0.0).astype(np.float32)


def _agreement(student, texts: list[str], teacher_labels: list[str]) -> float:
    return float(np.mean([p == t for p, t in zip(student.predict(texts), teacher_labels)]))


def _fit_static(task: TaskSpec, texts: list[str], P: np.ndarray, hard: np.ndarray, weight: np.ndarray,
                idf_texts: list[str]) -> StaticClassifier:
    s, t = task.student, task.train
    student = StaticClassifier.from_encoder(s.embedder, task.labels, s.dims, ngrams=s.ngrams,
                                            ngram_min_df=s.ngram_min_df)
    return student.fit(texts, P, hard_labels=hard, sample_weight=weight if np.any(weight != 1.0) else None,
                       alpha=t.alpha, temperature=t.temperature, c=t.c, dense_weight=s.dense_weight,
                       max_iter=t.max_iter, seed=t.seed, class_weights=balanced_class_weights(hard, len(task.labels)),
                       idf_texts=idf_texts)


# What to change for each reason curate drops a row (curate.REASONS), for train's "too few rows" error.
_FIXES = {"teacher_failed": "see `protege ledger` for why the teacher's calls failed",
          "invalid": "the teacher answered outside the label set / schema: check the instruction and labels",
          "gold_overlap": "inputs copy gold items: use different inputs (or raise curate.gold_overlap)",
          "length_outlier": "widen curate.min_words / max_words or set curate.length_iqr_k: null",
          "inconsistent": "lower curate.min_agreement or make the prompt less ambiguous",
          "low_confidence": "lower curate.min_confidence",
          "exact_duplicate": "add distinct inputs", "near_duplicate": "add distinct inputs (or raise curate.near_duplicate)",
          "review_dropped": "the review sheet marked them drop"}


def too_few_rows_message(task: TaskSpec, cur_dir: Path, n: int) -> str:
    """Why curate left fewer than 2 training rows: its drops by reason (from ``stats.json``) and how the input
    file shrank before the teacher saw it — so the fix named is the real one."""
    import json

    from .data import describe_pool, input_pool

    msg = f"{cur_dir / 'train.jsonl'} has {n} usable items; need at least 2"
    stats_file = cur_dir / "stats.json"
    st = json.loads(stats_file.read_text(encoding="utf-8")) if stats_file.is_file() else {}
    dropped = {k: v for k, v in (st.get("dropped") or {}).items() if v}
    if st:
        msg += f" — curate kept {st.get('n_kept', n)} of {st.get('n_in', '?')} teacher-labelled inputs"
        if dropped:
            top = sorted(dropped.items(), key=lambda kv: -kv[1])
            msg += ", dropped " + ", ".join(f"{v} {k}" for k, v in top)
            msg += f" (fix: {_FIXES.get(top[0][0], 'see ' + str(cur_dir / 'dropped.jsonl'))})"
    try:
        _, counts = input_pool(task)
    except Exception:  # the data files may have moved since generate; the curate figures stand alone
        counts = None
    if counts is not None and (counts["duplicates"] or counts["in_gold"] or counts["distinct"] < 2):
        msg += f"; before labelling, {describe_pool(counts)}"
    if not dropped and counts is not None and counts["distinct"] >= 2:
        msg += " — label more inputs (data.limit) or add rows to data.inputs"
    return msg


def train(task: TaskSpec, out: Path, *, force: bool = False) -> Path:
    cur_dir, stage_dir = Path(out) / "curate", Path(out) / "train"
    cur_cfg = require(cur_dir, "curate")
    fp = fingerprint({"upstream": cur_cfg["fingerprint"], "student": task.student.model_dump(),
                      "train": task.train.model_dump(), "recipe": TRAIN_RECIPE})
    if not force and is_fresh(stage_dir, fp):
        return stage_dir
    rows = read_jsonl(cur_dir / "train.jsonl")
    if len(rows) < 2:
        raise ValueError(too_few_rows_message(task, cur_dir, len(rows)))
    if task.kind != "classify":
        return _train_text(task, Path(out), stage_dir, fp, rows)
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
        student = _fit_static(task, [texts[i] for i in tr], P[tr], hard[tr], weight[tr], texts)
        if len(dv):
            dev_texts = [texts[i] for i in dv]
            dev_agreement = _agreement(student, dev_texts, [rows[i]["label"] for i in dv])
            # L2 and tempered soft targets leave the head under-confident (demo: mean confidence 0.69 at 0.94
            # accuracy); one temperature fitted on the held-out dev split against the teacher's labels
            # makes its confidence mean "chance the teacher would agree" — what a cascade threshold needs
            temperature = M.fit_temperature(student.decision_function(dev_texts), hard[dv])
            fit_idx = np.arange(len(rows))
            student = _fit_static(task, texts, P, hard, weight, texts).scale_logits(temperature)
    else:  # encoder / causal_lm: transformers / TRL trainers, `accelerate launch`-ready (protege.students)
        from .students import fit_student

        student = fit_student(task, [texts[i] for i in tr], P[tr], hard[tr],
                              sample_weight=weight[tr] if np.any(weight != 1.0) else None,
                              dev=([texts[i] for i in dv], P[dv]) if len(dv) else None, class_weights=class_w)
        if len(dv):
            dev_agreement = _agreement(student, [texts[i] for i in dv], [rows[i]["label"] for i in dv])
    seconds = time.perf_counter() - t0
    stats = {"n_train": int(len(fit_idx)), "n_dev": int(len(dv)), "dev_agreement_with_teacher": dev_agreement,
             "temperature": getattr(student, "temperature", None),
             "train_seconds": seconds, "epochs_run": len(student.history), "params": student.n_params,
             **_sources(rows, fit_idx),
             "weights": {s: sorted({float(r.get("weight", 1.0)) for r in rows if r.get("source", "teacher") == s})
                         for s in _SOURCES}}
    return _write_train(task, stage_dir, fp, student, stats)


_SOURCES = ("teacher", "real", "review")


def _sources(rows: list[dict], fit_idx) -> dict:
    """Rows by source (teacher labels, real labelled data, review corrections): all, and those fitted on."""
    return {"sources": {s: sum(r.get("source", "teacher") == s for r in rows) for s in _SOURCES},
            "sources_in_fit": {s: int(sum(rows[i].get("source", "teacher") == s for i in fit_idx)) for s in _SOURCES}}


def _write_train(task: TaskSpec, stage_dir: Path, fp: str, student, stats: dict) -> Path:
    from .students import is_main_process, wait_for_everyone

    if is_main_process():  # under `accelerate launch` every rank trains; rank 0 writes the artifact
        with stage_writer(stage_dir, {"stage": "train", "fingerprint": fp, "task": task.name}) as tmp:
            student.save_pretrained(tmp / "student")
            write_json(tmp / "stats.json", stats)
            write_json(tmp / "history.json", student.history)
    wait_for_everyone()
    return stage_dir


def _train_text(task: TaskSpec, out: Path, stage_dir: Path, fp: str, rows: list[dict]) -> Path:
    """extract / generate: a causal-LM student on (input, teacher output), SFT + token KD from stored top-k.

    A dev split (``train.dev_fraction``, at most 32 items, seeded) is held out of training; the trained
    student answers it and its agreement with the teacher's answers is reported.
    """
    from .students import fit_text_student
    from .textgen import same_answer

    topk_file = out / "generate" / "topk.safetensors"
    stored = None
    if topk_file.is_file() and any(r.get("topk_row") is not None for r in rows):
        from .teachers.topk_store import load_topk

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
        dev_agreement = float(np.mean([same_answer(task.kind, p, rows[i]["output"]) for p, i in zip(pred, dv)]))
    stats = {"n_train": len(tr), "n_dev": len(dv), "dev_agreement_with_teacher": dev_agreement,
             "train_seconds": seconds, "params": student.n_params, "kd": kd,
             "with_topk": int(sum(topk[i] is not None for i in tr)), "dropped_rows": getattr(student, "data_stats", None),
             **_sources(rows, tr),
             "weights": {src: sorted({float(r.get("weight", 1.0)) for r in rows if r.get("source", "teacher") == src})
                         for src in _SOURCES}}
    return _write_train(task, stage_dir, fp, student, stats)

"""What every student's training shares: dev splits carved from teacher-labelled rows (gold never reaches
this stage), class weights, and the row-source counts in stats.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from protege.task import TaskSpec

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


def agreement(student, texts: list[str], teacher_labels: list[str]) -> float:
    return float(np.mean([p == t for p, t in zip(student.predict(texts), teacher_labels)]))


SOURCES = ("teacher", "real", "review")


def sources(rows: list[dict], fit_idx) -> dict:
    """Rows by source (teacher labels, real labelled data, review corrections): all, and those fitted on."""
    return {"sources": {s: sum(r.get("source", "teacher") == s for r in rows) for s in SOURCES},
            "sources_in_fit": {s: int(sum(rows[i].get("source", "teacher") == s for i in fit_idx)) for s in SOURCES}}




def weights_by_source(rows: list[dict]) -> dict:
    """The loss weights in use per row source (teacher 1.0; real / review rows curate.real_weight)."""
    return {src: sorted({float(r.get("weight", 1.0)) for r in rows if r.get("source", "teacher") == src})
            for src in SOURCES}


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

    from protege.data import describe_pool, input_pool

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

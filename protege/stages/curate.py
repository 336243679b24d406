"""Stage 3: keep the teacher labels worth learning from, and mix in real labelled data.

A student copies its teacher's mistakes, and a teacher that gives different answers to the same
question teaches confusion. So before training we drop, each for a counted reason in ``stats.json``:

- ``teacher_failed`` — no answer; ``invalid`` — an answer outside the label set (classify) or not a
  JSON object valid against the task's schema (extract);
- ``gold_overlap`` — a training input that is (nearly) a copy of a gold input: a leak that makes the
  evaluation flatter the student;
- ``length_outlier`` — word count outside ``[min_words, max_words]`` or beyond Tukey fences on the log
  length (truncated scrapes, whole concatenated documents);
- ``inconsistent`` — the teacher's samples / prompt variants agree on the majority label less often than
  ``min_agreement``; ``low_confidence`` — top probability below ``min_confidence``;
- ``exact_duplicate`` / ``near_duplicate`` — an input seen already (MinHash, :mod:`protege.stages.dedup`).

Human labels win: corrections from ``protege review`` replace the teacher's label and, like the task's
real training data (``data.train``), skip the teacher-quality filters; only the leak and duplicate
filters apply to them, and duplicates are resolved in their favour. Corrections of *gold* items are
never trained on (that would leak the evaluation): they are reported as confirmed teacher errors or
disputed gold labels. Real and teacher rows are then mixed at ``real_fraction`` with loss weight
``real_weight``; ``train.jsonl`` carries each row's ``source`` and ``weight``.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from protege.artifacts import is_fresh, require, stage_writer
from protege.data import load_gold, load_real_train, read_jsonl, write_json, write_jsonl
from protege.stages.dedup import exact_duplicates, near_duplicates, overlaps
from protege.kinds import KINDS, kind_of
from protege.stages.review import apply_reviewed, corrections_path, read_corrections
from protege.stages.review_text import apply_text_corrections, read_text_corrections
from protege.stages.keys import CURATE, file_hash
from protege.task import CurateConfig, TaskSpec

# Order matters: a row dropped for several reasons is counted under the first one.
REASONS = ("review_dropped", "teacher_failed", "invalid", "gold_overlap", "length_outlier", "inconsistent",
           "low_confidence", "exact_duplicate", "near_duplicate")
HUMAN = ("review", "real")  # sources whose labels a person gave


# -- single-row checks (pure) ------------------------------------------------------------------

def word_count(text: str) -> int:
    return len(text.split())


def length_bounds(counts: Sequence[int], cfg: CurateConfig) -> tuple[float, float]:
    """[lo, hi] word counts to keep: the absolute limits, tightened by Tukey fences on log(1 + words).

    Log scale because text lengths are right-skewed; the IQR is floored at 0.25 (a factor of ~1.3) so a
    corpus of near-equal lengths does not flag every slightly longer text. Fences need ≥ 8 rows.
    """
    lo, hi = float(cfg.min_words), float(cfg.max_words) if cfg.max_words is not None else math.inf
    if cfg.length_iqr_k is not None and len(counts) >= 8:
        x = np.log1p(np.asarray(counts, dtype=float))
        q1, q3 = np.quantile(x, [0.25, 0.75])
        iqr = max(float(q3 - q1), 0.25)
        lo = max(lo, float(np.expm1(q1 - cfg.length_iqr_k * iqr)))
        hi = min(hi, float(np.expm1(q3 + cfg.length_iqr_k * iqr)))
    return lo, hi


# -- the filter over all rows (pure) -----------------------------------------------------------

def filter_rows(rows: list[dict], cfg: CurateConfig, *, labels: Sequence[str], kind: str = "classify",
                schema: dict | None = None, gold_texts: Sequence[str] = (),
                gold_ids: Sequence[str] | None = None) -> tuple[list[dict], list[dict], dict]:
    """(kept rows, dropped rows with ``reason`` / ``detail``, per-filter report).

    ``rows`` carry ``source`` ("review" / "real" / "teacher"); human rows skip the teacher-quality
    filters. Duplicates keep the first row in the order review → real → teacher → input order.
    ``report[name]`` = {"dropped": n (first reason), "flagged": n (this filter alone; for the duplicate
    filters: among rows still kept), ...settings}.
    """
    order = sorted(range(len(rows)), key=lambda i: (_rank(rows[i]), i))
    rows = [rows[i] for i in order]
    teach = [r.get("source", "teacher") not in HUMAN for r in rows]
    reason: list[str | None] = [r.get("_drop") for r in rows]
    detail: list[str | None] = ["reviewer marked it drop" if x else None for x in reason]
    flagged: Counter = Counter(x for x in reason if x)

    def flag(i: int, name: str, why: str | None = None) -> None:
        flagged[name] += 1
        if reason[i] is None:
            reason[i], detail[i] = name, why

    ok_counts = [word_count(r["text"]) for r, t in zip(rows, teach) if t and r.get("status") == "ok"]
    lo, hi = length_bounds(ok_counts, cfg)
    measured = sum(1 for r, t in zip(rows, teach) if t and int(r.get("samples") or 1) >= 2)
    gold_hits = overlaps([r["text"] for r in rows], list(gold_texts), cfg.gold_overlap)
    for i, r in enumerate(rows):
        if teach[i]:
            if r.get("status") != "ok":
                flag(i, "teacher_failed", r.get("error"))
                continue  # nothing else can be judged about a missing answer
            why = KINDS[kind].validity(r, labels, schema)
            if why:
                flag(i, "invalid", why)
        if gold_hits[i] is not None:
            j, s = gold_hits[i]
            flag(i, "gold_overlap", f"Jaccard {s:.2f} with gold " + (f"id {gold_ids[j]}" if gold_ids else f"input #{j}"))
        if teach[i]:
            wc = word_count(r["text"])
            if not lo <= wc <= hi:
                flag(i, "length_outlier", f"{wc} words, keep [{lo:.0f}, {hi:.0f}]")
            if int(r.get("samples") or 1) >= 2 and float(r.get("agreement", 1.0)) < cfg.min_agreement:
                flag(i, "inconsistent", f"agreement {float(r['agreement']):.2f}")
            if float(r.get("confidence") or 0.0) < cfg.min_confidence:
                flag(i, "low_confidence", f"confidence {float(r.get('confidence') or 0):.2f}")

    alive = [x is None for x in reason]
    texts = [r["text"] for r in rows]
    if cfg.dedup_exact:
        for i, j in enumerate(_among(exact_duplicates, texts, alive)):
            if j is not None:
                flag(i, "exact_duplicate", f"same text as id {rows[j]['id']}")
                alive[i] = False
    if cfg.near_duplicate is not None:
        for i, hit in enumerate(near_duplicates(texts, cfg.near_duplicate, keep=alive)):
            if hit is not None:
                flag(i, "near_duplicate", f"Jaccard {hit[1]:.2f} with id {rows[hit[0]]['id']}")
                alive[i] = False

    kept = [r for r, x in zip(rows, reason) if x is None]
    dropped = [{"id": r["id"], "source": r.get("source", "teacher"), "reason": x, "detail": d, "label": r.get("label")}
               for r, x, d in zip(rows, reason, detail) if x is not None]
    first = Counter(x for x in reason if x is not None)
    settings = {
        "teacher_failed": {}, "invalid": {"kind": kind, "schema": bool(schema)},
        "gold_overlap": {"jaccard_min": cfg.gold_overlap, "n_gold": len(gold_texts)},
        "length_outlier": {"keep_words": [lo, None if math.isinf(hi) else hi], "iqr_k": cfg.length_iqr_k},
        "inconsistent": {"min_agreement": cfg.min_agreement, "measured_rows": measured,
                         **({} if measured else {"note": "not measured: teacher.samples is 1"})},
        "low_confidence": {"min_confidence": cfg.min_confidence},
        "exact_duplicate": {"on": cfg.dedup_exact}, "near_duplicate": {"jaccard_min": cfg.near_duplicate},
    }
    report = {name: {"dropped": first.get(name, 0), "flagged": flagged.get(name, 0), **settings.get(name, {})}
              for name in REASONS}
    return kept, dropped, report


def _rank(r: dict) -> int:
    return {"review": 0, "real": 1}.get(r.get("source", "teacher"), 2)


def _among(fn, texts: list[str], alive: list[bool]) -> list[int | None]:
    """Apply a first-occurrence duplicate finder to the alive rows only, mapping indices back."""
    idx = [i for i, a in enumerate(alive) if a]
    res = fn([texts[i] for i in idx])
    out: list[int | None] = [None] * len(texts)
    for k, j in enumerate(res):
        if j is not None:
            out[idx[k]] = idx[j]
    return out


# -- review corrections and mixing (pure) ------------------------------------------------------

DROP = "drop"


def apply_corrections(pool: list[dict], corrections: dict[str, str], labels: Sequence[str],
                      gold: dict[str, str]) -> tuple[list[dict], dict]:
    """Replace teacher labels by reviewed ones. Returns (rows, review stats).

    ``corrections`` maps id → label (or ``"drop"``). Pool items become ``source="review"`` rows with a
    one-hot distribution; ``gold`` (id → gold label) items are never returned — they are counted as
    teacher errors the reviewer confirmed (reviewer = gold) or gold labels they dispute.
    """
    return apply_reviewed(pool, corrections, gold, "label", lambda a, b: a == b, lambda r, c: {
        "id": r["id"], "text": r["text"], "label": c, "probs": one_hot(c, labels), "confidence": 1.0,
        "agreement": 1.0, "status": "ok", "source": "review", "teacher_label": r.get("label"),
        "teacher_confidence": r.get("confidence")})


def one_hot(label: str, labels: Sequence[str]) -> list[float]:
    return [float(lab == label) for lab in labels]


def mix(rows: list[dict], real_fraction: float | None, real_weight: float, seed: int = 0) -> tuple[list[dict], dict]:
    """Set each row's ``weight`` and down-sample to ``real_fraction`` human rows. Returns (rows, stats).

    Down-sampling (never duplication: repeating rows is what the weight is for) trims whichever side
    is in excess; review corrections are the last human rows to go. Input order is kept.
    """
    human = [i for i, r in enumerate(rows) if r.get("source") in HUMAN]
    teacher = [i for i, r in enumerate(rows) if r.get("source") not in HUMAN]
    rng = random.Random(seed)
    keep = set(range(len(rows)))
    note = None
    if real_fraction is not None:
        h, t = len(human), len(teacher)
        if h == 0:
            note = "real_fraction set but there is no real labelled data (data.train or review corrections)"
        elif t == 0:
            note = "real_fraction set but there are no teacher rows"
        elif h / (h + t) > real_fraction:
            k = max(1, round(real_fraction * t / (1 - real_fraction)))
            review = [i for i in human if rows[i].get("source") == "review"]
            real = [i for i in human if rows[i].get("source") != "review"]
            rng.shuffle(real)
            rng.shuffle(review)
            keep -= set((real + review)[: h - k])  # data.train rows go first, corrections last
        else:
            k = max(1, round(h * (1 - real_fraction) / real_fraction))
            keep -= set(rng.sample(teacher, t - k)) if t > k else set()
    out = []
    for i in sorted(keep):
        r = dict(rows[i])
        r["weight"] = real_weight if r.get("source") in HUMAN else 1.0
        out.append(r)
    counts = Counter(r.get("source", "teacher") for r in out)
    stats = {"real_fraction_target": real_fraction, "real_weight": real_weight,
             "real_fraction": (sum(counts[s] for s in HUMAN) / len(out)) if out else 0.0,
             "sources": {s: counts.get(s, 0) for s in ("teacher", "real", "review")},
             "dropped_by_mix": len(rows) - len(out)}
    if note:
        stats["note"] = note
    return out, stats


# -- the stage ---------------------------------------------------------------------------------

def review_files(task: TaskSpec, out: Path) -> list[Path]:
    files = [task.path(task.curate.review_file)] if task.curate.review_file else []
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"curate.review_file: {f} not found (paths start at the task file's folder)")
    stored = corrections_path(out)
    return files + ([stored] if stored.is_file() else [])


def curate(task: TaskSpec, out: Path, *, force: bool = False) -> Path:
    """Filter the generate artifact, apply review corrections, mix real data; write ``<out>/curate``."""

    gen_dir, stage_dir = Path(out) / "generate", Path(out) / "curate"
    gen_cfg = require(gen_dir, "generate")
    reviews = review_files(task, out)
    fp = CURATE.key(task, upstream=gen_cfg["fingerprint"], extra={"reviews": [file_hash(p) for p in reviews]})
    if not force and is_fresh(stage_dir, fp):
        return stage_dir
    pool = read_jsonl(gen_dir / "train.jsonl")
    gold = load_gold(task)
    classify = kind_of(task).labelled
    corrections: dict[str, str] = {}
    for p in reviews:  # later files win; classify sheets hold labels, extract / generate sheets whole answers
        corrections.update(read_corrections(p, task.labels) if classify else read_text_corrections(p, task))
    pool, gold_by_id = [{**r, "source": "teacher"} for r in pool], {g["id"]: g["label"] for g in gold}
    rows, review = (apply_corrections(pool, corrections, task.labels, gold_by_id) if classify
                    else apply_text_corrections(task, pool, corrections, gold_by_id))
    if classify:
        real = [{**r, "probs": one_hot(r["label"], task.labels), "confidence": 1.0, "agreement": 1.0, "source": "real",
                 "status": "ok"} for r in load_real_train(task)]
    else:  # extract / generate: the real answer is the training target
        real = [{**r, "output": r["label"], "confidence": 1.0, "agreement": 1.0, "source": "real", "status": "ok",
                 "topk_row": None} for r in load_real_train(task)]
    kept, dropped, filters = filter_rows(rows + real, task.curate, labels=task.labels, kind=task.kind,
                                         schema=task.schema_, gold_texts=[g["text"] for g in gold],
                                         gold_ids=[g["id"] for g in gold])
    final, mixing = mix(kept, task.curate.real_fraction, task.curate.real_weight, task.data.seed)
    src = mixing["sources"]
    stats = {"n_in": len(pool), "n_kept": src["teacher"], "n_real": src["real"], "n_review": src["review"],
             "n_train": len(final), "dropped": dict(Counter(d["reason"] for d in dropped)), "filters": filters,
             "mix": mixing, "sources": src, "review": {**review, "files": [str(p) for p in reviews]},
             "label_counts": dict(Counter(r["label"] for r in final)) if classify else None}
    with stage_writer(stage_dir, {"stage": "curate", "fingerprint": fp, "task": task.name}) as tmp:
        write_jsonl(tmp / "train.jsonl", final)
        write_jsonl(tmp / "dropped.jsonl", dropped)
        write_json(tmp / "stats.json", stats)
    return stage_dir

"""``generate.strategy: active`` — the teacher labels the inputs the cheapest student is least sure of, in rounds.

1. The teacher answers the gold *inputs* (as in random generate: evaluate needs them; their teacher labels are also
   this stage's learning curve — gold labels are never read) and a random seed batch of the pool.
2. Each round: fit the static student (:class:`~protege.students.classifier.StaticClassifier`, seconds) on every
   row labelled so far; record its agreement with the teacher on the gold inputs against the calls spent; score
   the unlabelled pool; the next batch is the smallest-margin inputs (top-1 minus top-2 probability), skipping a
   candidate whose student embedding is within ``dedup_cosine`` of one already picked, so a batch is not ten
   copies of one confusing template (uncertainty + diversity, cf. margin sampling with a diversity filter).
3. Stop when a round gains less than ``active.min_gain`` agreement, after ``active.rounds`` rounds, when
   ``data.limit`` inputs are labelled, when the pool is used up, or when the budget stops a call.

Every call goes through :func:`protege.stages.generate.label_with_ledger`. The run is deterministic given the
teacher's answers (seeded shuffles, a convex student fit, stable sorts), so a run killed with ``kill -9`` and
started again replays its rounds from the ledger — the same batches, no call repeated — and continues where it
stopped. A budget stop keeps what was labelled (answers of a partly sent batch are read back from the ledger).

Evaluation is unchanged: the gold set is the random held-out set, so active and random runs compare fairly there.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np

from protege.artifacts import is_fresh
from protege.teachers.base import Answer
from protege.teachers.ledger import BudgetExceeded, Ledger, request_key
from protege.task import TaskSpec


def active_key(task: TaskSpec) -> dict:
    """What active labelling adds to the generate stage's cache key (nothing for strategy: random)."""
    g = task.generate
    return {} if g.strategy == "random" else {"generate": g.model_dump(mode="json")}


def margins(P: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability per row: small = unsure."""
    s = np.sort(np.asarray(P, dtype=float), axis=1)
    return s[:, -1] - s[:, -2]


def pick_batch(P: np.ndarray, E: np.ndarray | None, batch: int, candidates: int, dedup_cosine: float) -> list[int]:
    """Indices (into P's rows) of the next batch: smallest margin first, near-duplicates (cosine ≥ dedup_cosine in
    the embedding ``E``) skipped while there are other candidates; filled from the skipped ones if short."""
    order = np.argsort(margins(P), kind="stable")[: batch * candidates]
    if E is None:
        return [int(i) for i in order[:batch]]
    U = E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12)
    picked: list[int] = []
    skipped: list[int] = []
    for i in order:
        if len(picked) == batch:
            break
        if picked and float((U[picked] @ U[i]).max()) >= dedup_cosine:
            skipped.append(int(i))
        else:
            picked.append(int(i))
    return picked + skipped[: batch - len(picked)]


def student_for(task: TaskSpec, texts: list[str]):
    """A fresh static student (the cheapest rung) with the task's settings; the table is cached on disk. With
    ``ngram_analyzer: auto`` the texts choose word or character n-grams (``preferred_analyzer``: characters for
    text with few word breaks — Chinese, Japanese, Thai — where word n-grams see one "word" per clause)."""
    from protege.students.classifier import StaticClassifier
    from protege.students.ngrams import preferred_analyzer

    s = task.student
    analyzer = preferred_analyzer(texts, s.ngram_analyzer)
    return StaticClassifier.from_encoder(s.embedder, task.labels, s.dims, ngrams=s.ngrams,
                                         ngram_min_df=s.ngram_min_df, ngram_analyzer=analyzer)


def fit_student(task: TaskSpec, rows: list[dict]):
    labels = task.labels
    P = np.array([r["probs"] for r in rows], dtype=np.float32)
    hard = np.array([labels.index(r["label"]) for r in rows])
    t = task.train
    texts = [r["text"] for r in rows]
    return student_for(task, texts).fit(texts, P, hard_labels=hard, alpha=t.alpha,
                                 temperature=t.temperature, c=t.c, dense_weight=task.student.dense_weight,
                                 max_iter=t.max_iter, seed=t.seed)


def from_ledger(teacher, ledger: Ledger, texts: list[str], samples: int) -> list[list[Answer]]:
    """The answers the ledger holds for ``texts`` (after a budget stop: the part of a batch that was sent)."""
    keys = [[request_key(teacher.name, teacher.request(t, s), s) for s in range(samples)] for t in texts]
    got = ledger.lookup([k for ks in keys for k in ks])
    return [[Answer.from_json(got[k]) for k in ks if k in got] for ks in keys]


def generate_active(task: TaskSpec, out: Path, *, fp: str, label_with_ledger, summarise, write_artifact, teacher_timing,
                    force: bool = False) -> Path:
    """Active labelling; writes ``<out>/generate`` in the same shape as random generate, plus ``stats["active"]``.

    The generate stage's own pieces come in as arguments (it calls this), so the two modules do not import each
    other: ``fp`` its cache key, ``label_with_ledger`` / ``summarise`` / ``write_artifact`` / ``teacher_timing``."""
    from protege.data import input_pool, load_gold
    from protege.registry import make_teacher

    stage_dir = Path(out) / "generate"
    if not force and is_fresh(stage_dir, fp):
        return stage_dir
    a, labels, samples, budget = task.generate.active, task.labels, task.teacher.samples, task.teacher.budget_usd
    pool, _ = input_pool(task)
    random.Random(task.data.seed).shuffle(pool)
    cap = min(len(pool), task.data.limit or len(pool))
    gold = load_gold(task)
    teacher, ledger = make_teacher(task), Ledger(Path(out) / "ledger.sqlite")
    labelled: list[int] = []  # indices into pool, in labelling order
    answers: dict[int, list[Answer]] = {}
    calls = {"n": 0, "usd": 0.0, "cache_hits": 0}
    curve, stopped = [], None

    def label(idx: list[int], stage: str) -> bool:
        texts = [pool[i]["text"] for i in idx]
        try:
            got, st = label_with_ledger(teacher, texts, ledger, stage=stage, samples=samples, budget_usd=budget,
                                        description=f"teacher: {stage}")
        except BudgetExceeded as e:
            st = getattr(e, "stats", {})
            got = from_ledger(teacher, ledger, texts, samples)
            idx = [i for i, g in zip(idx, got) if g]
            got = [g for g in got if g]
            ok = False
        else:
            ok = True
        calls["n"] += int(st.get("calls", 0))
        calls["usd"] += float(st.get("usd", 0.0))
        calls["cache_hits"] += int(st.get("cache_hits", 0))
        for i, g in zip(idx, got):
            answers[i] = g
            labelled.append(i)
        return ok

    try:
        held, gold_stats = label_with_ledger(teacher, [r["text"] for r in gold], ledger, stage="gold", samples=1,
                                             budget_usd=budget, description="teacher: gold inputs")
        gold_rows = [{"id": r["id"], **summarise(g, labels, None)} for r, g in zip(gold, held)]
        dev = [(r["text"], g["label"]) for r, g in zip(gold, gold_rows) if g["label"] is not None]
        seed_n = min(cap, a.seed_size or a.batch)
        ok = label(list(range(seed_n)), "generate")
        prev = None
        for rnd in range(a.rounds + 1):
            rows = [{"text": pool[i]["text"], **summarise(answers[i], labels, None)} for i in labelled]
            rows = [r for r in rows if r["status"] == "ok"]
            student = fit_student(task, rows) if len({r["label"] for r in rows}) >= 2 else None
            agr = (float(np.mean([p == y for p, y in zip(student.predict([t for t, _ in dev]), [y for _, y in dev])]))
                   if student is not None and dev else None)
            # calls = teacher requests these labels cost, paid in this run or an earlier one (the ledger)
            curve.append({"round": rnd, "n_labelled": len(labelled), "calls": len(labelled) * samples, "agreement": agr})
            if not ok:
                stopped = "budget"
                break
            if prev is not None and agr is not None and agr - prev < a.min_gain:
                stopped = f"gain {agr - prev:+.4f} < min_gain {a.min_gain}"
                break
            prev = agr if agr is not None else prev
            rest = [i for i in range(len(pool)) if i not in answers]
            room = cap - len(labelled)
            if not rest or room <= 0:
                stopped = "pool used up" if not rest else f"data.limit {cap} reached"
                break
            if rnd == a.rounds:
                stopped = f"{a.rounds} rounds"
                break
            texts = [pool[i]["text"] for i in rest]
            if student is None:
                nxt = rest[: min(a.batch, room)]
            else:
                E = student.encode(texts)
                nxt = [rest[j] for j in pick_batch(student.predict_proba(texts), E, min(a.batch, room), a.candidates,
                                                    a.dedup_cosine)]
            ok = label(nxt, "generate")
        timing = teacher_timing(teacher, ledger, [r["text"] for r in gold[:8]])
    finally:
        ledger.close()
        teacher.close()

    train_rows = [{"id": pool[i]["id"], "text": pool[i]["text"], **summarise(answers[i], labels, None)} for i in labelled]
    stats = {"n_inputs": len(train_rows), "n_gold_inputs": len(gold), "samples": samples,
             "inputs": {"calls": calls["n"], "usd": calls["usd"], "cache_hits": calls["cache_hits"]}, "gold": gold_stats,
             "failed_items": sum(r["status"] != "ok" for r in train_rows), "calibration": None,
             "label_counts": dict(Counter(r["label"] for r in train_rows if r["label"])),
             "soft_labels": dict(Counter(r["soft"] for r in train_rows)), "timing": timing,
             "teacher": teacher.display_name, "teacher_id": teacher.name,
             "active": {"strategy": "active", "pool": len(pool), "curve": curve, "stopped": stopped,
                        "curve_on": f"teacher labels of the {len(dev)} gold inputs (gold labels not read)",
                        "settings": a.model_dump(mode="json")}}
    return write_artifact(task, stage_dir, fp, train_rows, gold_rows, stats, [None] * len(train_rows))


__all__ = ["active_key", "generate_active", "margins", "pick_batch"]

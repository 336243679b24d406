"""``student.kind: auto`` — the student ladder: train the rungs that fit the latency budget, pick by
cross-validated agreement with the teacher, refit the winner on every row.

1. **Folds**: K stratified folds of the *teacher-labelled* rows (K = ``student.cv_folds``, capped at 3 above
   2,000 rows and 2 above 8,000: the CV then costs less than the data it guards). Gold never reaches here.
2. **Each rung** (:mod:`protege.students.rungs`) scores its grid of settings out of fold; its best setting
   (highest agreement; ties to the earlier, simpler grid entry) is its CV result: agreement with a bootstrap
   CI over the out-of-fold items, per-label recall (the teacher's label as truth).
3. **Latency**: each rung refitted on all rows is timed one item per call on one core — CPU time of the calling
   thread (``time.thread_time``), median over 20 items, best of 5 passes (:func:`single_ms`), so a busy
   machine does not make a rung look slower than one free core runs it.
   A rung over ``student.max_ms`` is not eligible (it is still trained when static-distilled needs it as its
   labeller, and reported).
4. **Choice**: the eligible rung with the best CV agreement, except that a faster eligible rung whose
   out-of-fold agreement is within one standard error of the paired difference to the best one wins (the
   one-standard-error rule: a difference the folds cannot resolve is not worth slower inference).
5. **Learning curve** of the chosen rung (:mod:`protege.students.curve`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from protege.students.curve import expected_agreement, fit_curve
from protege.students.rungs import Data, best_setting

__all__ = ["run_ladder", "stratified_folds", "effective_folds", "choose", "single_ms", "expected_agreement"]

CURVE_FRACTIONS = (0.125, 0.25, 0.5, 1.0)


def effective_folds(n: int, cv_folds: int) -> int:
    k = cv_folds if n <= 2000 else min(cv_folds, 3) if n <= 8000 else min(cv_folds, 2)
    return max(2, min(k, n // 2))


def stratified_folds(hard: np.ndarray, k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """K (train, held-out) index pairs; each label's rows dealt round-robin after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(hard), dtype=int)
    start = 0
    for lab in np.unique(hard):
        idx = rng.permutation(np.flatnonzero(hard == lab))
        fold[idx] = (start + np.arange(len(idx))) % k
        start += len(idx)
    return [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(k)]


def single_ms(predict, texts: Sequence[str], n: int = 20, passes: int = 5) -> float:
    """ms per one-item call on one core: CPU time of the calling thread (``time.thread_time``), the median over
    ``n`` items, the lowest of ``passes`` passes — on a shared machine, other processes inflate even CPU time
    (shared caches, SMT siblings) in bursts; the best pass's median is what the rung costs on a core of its own."""
    import statistics

    texts = list(texts)[:n] or [""]
    predict(texts[:2])
    medians = []
    for _ in range(passes):
        out = []
        for t in texts:
            t0 = time.thread_time()
            predict([t])
            out.append(time.thread_time() - t0)
        medians.append(statistics.median(out))
    return min(medians) * 1000


def _one_thread():
    import contextlib

    @contextlib.contextmanager
    def ctx():
        import torch

        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)

    return ctx()


def _scored(logits: np.ndarray, hard: np.ndarray) -> np.ndarray:
    """Per item: 1/0 agreement with the teacher; NaN where the item was not scored (encoder: first fold only)."""
    seen = np.isfinite(logits).all(1)
    ok = np.full(len(hard), np.nan)
    ok[seen] = (logits[seen].argmax(1) == hard[seen]).astype(float)
    return ok


def _recall(logits: np.ndarray, hard: np.ndarray, labels: list[str]) -> dict:
    seen = np.isfinite(logits).all(1)
    pred = logits[seen].argmax(1)
    h = hard[seen]
    return {lab: (float(np.mean(pred[h == i] == i)) if np.any(h == i) else None) for i, lab in enumerate(labels)}


def choose(rungs: list[dict], ok: dict[str, np.ndarray]) -> tuple[str, str]:
    """(chosen rung name, why) by the rule in the module docstring. ``ok``: per-item agreement arrays."""
    scored = [r for r in rungs if r.get("cv_agreement") is not None]
    elig = [r for r in scored if r["eligible"]]
    if not elig:
        if not scored:
            why = "; ".join(f"{r['name']}: {r.get('error') or r.get('skipped')}" for r in rungs)
            raise ValueError(f"no ladder rung could be trained ({why})")
        r = min(scored, key=lambda r: r["ms_p50"])
        return r["name"], (f"no rung ran within max_ms; {r['name']} is the fastest ({r['ms_p50']:.2f} ms), "
                           f"CV agreement {r['cv_agreement']:.3f}")
    best = max(elig, key=lambda r: r["cv_agreement"])
    close = []
    for r in elig:
        both = np.isfinite(ok[best["name"]]) & np.isfinite(ok[r["name"]])
        dlt = ok[best["name"]][both] - ok[r["name"]][both]
        se = float(dlt.std(ddof=1) / np.sqrt(len(dlt))) if len(dlt) > 1 else 0.0
        if r is best or (len(dlt) and dlt.mean() <= se):
            close.append((r, float(dlt.mean()) if len(dlt) else 0.0, se))
    r, gap, se = min(close, key=lambda t: t[0]["ms_p50"])
    if r is best:
        others = [x for x in elig if x is not best]
        nxt = max(others, key=lambda x: x["cv_agreement"]) if others else None
        tail = f", ahead of {nxt['name']} ({nxt['cv_agreement']:.3f})" if nxt else ""
        return r["name"], (f"{r['name']} has the best CV agreement with the teacher ({r['cv_agreement']:.3f}{tail}) "
                           f"within max_ms ({r['ms_p50']:.2f} ms)")
    return r["name"], (f"{r['name']} ({r['cv_agreement']:.3f}, {r['ms_p50']:.2f} ms) is within one standard error "
                       f"({se:.3f}) of {best['name']} ({best['cv_agreement']:.3f}, {best['ms_p50']:.2f} ms) and faster")


def _oof_probs(z: np.ndarray) -> np.ndarray:
    """Out-of-fold probabilities (no temperature: a saved non-chosen rung has none), NaN rows where unscored."""
    seen = np.isfinite(z).all(1)
    return np.where(seen[:, None], _softmax(np.where(seen[:, None], z, 0.0)), np.nan).astype(np.float32)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def _size(student) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="protege-size-"))
    try:
        student.save_pretrained(tmp / "s")
        return int(sum(p.stat().st_size for p in (tmp / "s").rglob("*") if p.is_file()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_ladder(d: Data, rungs: list, *, max_ms: float, cv_folds: int, log=lambda s: None,
               curve: bool = True, ray=None, time_budget_s: float | None = None) -> tuple[object, dict, dict, dict]:
    """Train, score, time and choose. Returns (winner student, {rung: refitted student}, ladder stats,
    learning-curve stats) — the two dicts as ``train/stats.json`` holds them. ``ray`` (the module, connected): the
    rungs that build on no other rung train at once, as Ray tasks (:func:`fit_ahead`). ``time_budget_s``: rungs
    that would not fit what is left of it are skipped (:func:`over_budget`)."""
    from protege import metrics as M
    from protege.stats import bootstrap_ci

    k = effective_folds(len(d.texts), cv_folds)
    folds = stratified_folds(d.hard, k, d.seed)
    timing_texts = [d.texts[i] for i in np.random.default_rng(d.seed).permutation(len(d.texts))[:40]]
    by_name = {r.name: r for r in rungs}
    stats, ok, best_logits, students, chosen_params = [], {}, {}, {}, {}
    t_start = time.perf_counter()
    left = lambda: None if time_budget_s is None else time_budget_s - (time.perf_counter() - t_start)  # noqa: E731
    skip = {r.name: why for r in rungs if (why := over_budget(r, folds, left(), whole=True))}
    ahead = fit_ahead([r for r in rungs if r.name not in skip], folds, timing_texts, d.hard, ray)
    for rung in rungs:
        t0 = time.perf_counter()
        entry = {"name": rung.name, "params": None, "cv_agreement": None, "cv_ci": None, "ms_p50": None,
                 "size_bytes": None, "train_s": None, "eligible": False, "folder": None, "per_label_recall_cv": None}
        why_skip = skip.get(rung.name) or (over_budget(rung, folds, left()) if rung.name not in ahead else None)
        if why_skip and ok:  # the first rung always runs: a ladder that chose nothing would leave no student
            ahead.pop(rung.name, None)
            entry.update(skipped=why_skip, train_s=0.0)
            log(f"ladder: {rung.name} skipped: {why_skip}")
            stats.append(entry)
            continue
        try:
            if hasattr(rung, "bind"):
                rung.bind(by_name, chosen_params)
            got = ahead.pop(rung.name, None) or fit_rung((rung, folds, timing_texts, d.hard))
            if isinstance(got, Exception):
                raise got
            logits, scores, g, student, ms = got
        except Exception as e:  # noqa: BLE001 - one rung that cannot run (a missing extra) must not sink the ladder
            entry.update(error=f"{type(e).__name__}: {e}", train_s=time.perf_counter() - t0)
            log(f"ladder: {rung.name} failed: {entry['error']}")
            stats.append(entry)
            continue
        okr = _scored(logits[g], d.hard)
        ok[rung.name], best_logits[rung.name], chosen_params[rung.name] = okr, logits[g], rung.grid[g]
        lo, hi = bootstrap_ci(okr[np.isfinite(okr)])
        entry.update(params=rung.grid[g], cv_agreement=float(np.nanmean(okr)), cv_ci=[float(lo), float(hi)],
                     grid=[{"params": p, "cv_agreement": float(s) if np.isfinite(s) else None} for p, s in zip(rung.grid, scores)],
                     ms_p50=ms, eligible=bool(ms <= max_ms), size_bytes=_size(student),
                     train_s=time.perf_counter() - t0, folder=f"ladder/{rung.name}",
                     per_label_recall_cv=_recall(logits[g], d.hard, d.labels))
        if getattr(rung, "n_pseudo", None) is not None:
            entry["n_pseudo_labelled"] = int(rung.n_pseudo)
        students[rung.name] = student
        stats.append(entry)
        log(f"ladder: {rung.name} {rung.grid[g]} CV agreement {entry['cv_agreement']:.3f} {ms:.2f} ms "
            f"({entry['train_s']:.0f} s)")
    name, why = choose(stats, ok)
    winner = students[name]
    # temperature from the chosen rung's out-of-fold logits: confidence = chance the teacher agrees
    z = best_logits[name]
    seen = np.isfinite(z).all(1)
    temp = 1.0
    if hasattr(winner, "scale_logits") and seen.sum() >= 2:
        temp = M.fit_temperature(z[seen], d.hard[seen])
        winner.scale_logits(temp)
    # out-of-fold probabilities of the chosen rung (temperature applied): a calibration set of teacher-labelled
    # rows that the model scoring them never trained on — the cascade's conformal gate is fitted on it
    zc = np.where(seen[:, None], z, 0.0) / temp
    winner.calibration = {"probs": np.where(seen[:, None], _softmax(zc), np.nan).astype(np.float32),
                          "teacher": d.hard.astype(np.int64), "rung": name,
                          "by_rung": {r: _oof_probs(z) for r, z in best_logits.items() if r != name}}
    ladder = {"max_ms": max_ms, "folds": k, "chosen": name, "why": why, "rungs": stats, "time_budget_s": time_budget_s,
              "rule": "best CV agreement within max_ms; a faster rung within one paired standard error wins",
              "ms_p50_measure": "CPU time of one-item calls on one thread (time.thread_time): median over 20 items, best of 5 passes"}
    lc = {}
    if curve and (left() is None or left() > 0):
        lc = learning_curve(by_name[name], chosen_params[name], folds, d, ok[name])
    elif curve:
        ladder["curve_skipped"] = f"time budget spent ({time_budget_s:.0f} s, student.time_budget_s)"
    ladder["seconds"] = time.perf_counter() - t_start
    return winner, students, ladder, lc


def over_budget(rung, folds, left: float | None, whole: bool = False) -> str | None:
    """Why ``rung`` should not start with ``left`` seconds of the ladder's budget (None: it may). A rung may say
    itself why it does not apply (``skip_reason()``: the encoder below its minimum rows). A rung that can
    estimate its cost (``estimate_s(folds)``: the encoder times a few real training steps) is skipped when the
    estimate exceeds what is left; any rung is skipped once nothing is left. Rungs that cannot estimate run —
    the cheap ones (static, frozen) cost seconds to minutes. The ladder ignores this for its first rung (no
    student at all is worse than a late one). ``whole``: ``left`` is the whole budget (the check before any rung
    runs, for the rungs that train at once on Ray), which the reason then says."""
    why = rung.skip_reason() if hasattr(rung, "skip_reason") else None
    if why or left is None:
        return why
    if left <= 0:
        return "time budget spent (student.time_budget_s)"
    try:
        est = rung.estimate_s(folds) if hasattr(rung, "estimate_s") else None
    except Exception as e:  # noqa: BLE001 - a rung that cannot even time a step (a missing extra) cannot train
        return f"could not estimate its training time: {type(e).__name__}: {e}"[:300]
    if est is not None and est > left:
        return (f"estimated {est:.0f} s, more than the whole student.time_budget_s ({left:.0f} s)" if whole
                else f"estimated {est:.0f} s, {left:.0f} s left of student.time_budget_s")
    return None


def fit_rung(job: tuple) -> tuple:
    """One rung's work: prepare, CV over its grid, refit the best setting, time it. ``job``: (rung, folds,
    timing texts, teacher labels). Returns (logits, scores, best index, student, ms)."""
    rung, folds, timing_texts, hard = job
    rung.prepare()
    logits = rung.cv(folds, rung.grid)
    scores, g = best_setting(logits, hard)  # first best: the grid lists simpler / more regularised settings first
    student = rung.refit(rung.grid[g])
    with _one_thread():
        ms = single_ms(student.predict_proba, timing_texts)
    return logits, scores, g, student, ms


def _fit_remote(job: tuple) -> tuple:
    """:func:`fit_rung` in a Ray task: its error returned (one rung that cannot run must not sink the others), and
    the rung itself sent back, prepared (a later rung builds on its state)."""
    try:
        return job[0], fit_rung(job)
    except Exception as e:  # noqa: BLE001
        return job[0], e


def fit_ahead(rungs: list, folds, timing_texts, hard: np.ndarray, ray=None) -> dict:
    """With Ray: the rungs that build on no other (no ``bind``: static, frozen, encoder) fitted at once, one Ray task
    each; {name: fit_rung's result, or its exception}. Each rung's prepared state is copied back into the rung the
    ladder holds, so static-distilled builds on it as if it had run here. Without Ray: {} (all run in the loop)."""
    from protege.parallel import map_tasks

    free = [r for r in rungs if not hasattr(r, "bind")]
    if ray is None or len(free) < 2:
        return {}
    try:
        results = map_tasks(_fit_remote, [(r, folds, timing_texts, hard) for r in free], ray=ray)
    except Exception as e:  # noqa: BLE001 - e.g. a result that cannot be pickled back: train them here instead
        import warnings

        warnings.warn(f"ladder: training the rungs on Ray failed ({type(e).__name__}: {e}); training them here")
        return {}
    out = {}
    for rung, (done, got) in zip(free, results):
        rung.__dict__.update(done.__dict__)
        out[rung.name] = got
    return out


def learning_curve(rung, params: dict, folds, d: Data, full_ok: np.ndarray) -> dict:
    """Agreement of ``rung`` at 1/8 … 1/1 of each fold's training part, on the held-out parts, + the power-law fit."""
    from protege.stats import bootstrap_ci

    n_train = float(np.mean([len(tr) for tr, _ in folds]))
    ns, agr, cis = [], [], []
    for frac in CURVE_FRACTIONS:
        n = n_train * frac
        if n < max(10, 2 * len(d.labels)) and frac < 1.0:
            continue
        okf = full_ok if frac >= 1.0 else _scored(rung.cv(folds, [params], frac)[0], d.hard)
        okf = okf[np.isfinite(okf)]
        lo, hi = bootstrap_ci(okf)
        ns.append(int(round(n)))
        agr.append(float(okf.mean()))
        cis.append([float(lo), float(hi)])
    return {"rung": rung.name, "n": ns, "agreement": agr, "agreement_ci": cis, "fit": fit_curve(ns, agr),
            "n_all_rows": len(d.texts)}


RUNGS = ("static", "frozen", "static-distilled", "encoder")


def build_rungs(task, d: Data, names: Sequence[str] | None = None) -> list:
    """The rungs ``student.rungs`` names, in ladder order: static-distilled after static and frozen (it builds on
    both), the encoder last (the dearest: it runs only if its estimate fits what the time budget has left)."""
    from protege.students.rungs import DistilledRung, EncoderRung, FrozenRung, StaticRung

    s, t = task.student, task.train
    want = list(names if names is not None else s.rungs)
    unknown = [n for n in want if n not in RUNGS]
    if unknown:
        raise ValueError(f"student.rungs: unknown rung(s) {unknown}; use {list(RUNGS)}")
    from protege.students.ngrams import analyzer_options

    analyzers = analyzer_options(d.texts, getattr(s, "ngram_analyzer", "auto"))
    static = StaticRung(d, s.embedder, s.dims, s.ngrams, s.ngram_min_df, t.c, s.dense_weight, analyzers)
    frozen = FrozenRung(d, s.embedder, s.ngram_min_df, analyzers=analyzers)
    out = []
    if "static" in want or "static-distilled" in want:
        out.append(static)
    if "frozen" in want or "static-distilled" in want:  # static-distilled's labeller
        out.append(frozen)
    if "static-distilled" in want:
        out.append(DistilledRung(d, static, frozen))
    if "encoder" in want:  # last: the dearest to train, it gets what the time budget has left
        out.append(EncoderRung(d, task))
    return out


class AutoStudent:
    """``student.kind: auto`` in the registry. The ladder runs in the train stage
    (:mod:`protege.stages.train.auto`); what it saves is the winner's own folder (``protege_student`` names
    static / frozen / encoder), so loading never comes here — :meth:`from_pretrained` delegates anyway."""

    @classmethod
    def from_pretrained(cls, path):
        from protege.registry import load_student

        return load_student(path)

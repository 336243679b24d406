"""The student ladder in the report: every rung scored on gold, per-label recall, and how many labels to buy.

Train (``student.kind: auto``) picks the rung on teacher-labelled held-out folds and writes ``ladder`` and
``learning_curve`` into ``train/stats.json``. Evaluate only *reports*: each rung saved under
``train/ladder/<rung>/`` is loaded and scored on the same gold items as the chosen student (accuracy with a
95% bootstrap CI, exact McNemar p against the chosen student, agreement with the teacher, single-item p50
timed in this run). Nothing here selects anything on gold.

``labels_to_buy`` evaluates the learning-curve fit (agreement with the teacher vs labels, a power law
``a - b * n**(-c)``) at more labels and prices them at the teacher's measured $ per labelled input. It is
agreement with the teacher on held-out folds, extrapolated — not gold accuracy — and says so.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from protege import metrics as M
from protege.kinds import kind_of
from protege.students import load_student
from protege.task import TaskSpec

RECALL_GAP = 0.10      # flag a label when the student's recall is this far below the teacher's ...
RECALL_MIN_MISSED = 3  # ... and it misses at least this many more gold items of that label than the teacher
EXTRA_FACTORS = (0.5, 1.0, 3.0)  # labels to buy, as multiples of the labels the student trained on (1.5x, 2x, 4x)


def expected_agreement(fit: dict, n: float) -> float | None:
    """The learning curve's fit at ``n`` labels — :func:`protege.students.curve.expected_agreement`, the train
    side's own formula (``a - b * n**(-c)``, clipped to [0, 1]) — or None for a fit a report cannot use
    (missing or non-finite parameters, n <= 0), as a stats.json written by another version may hold."""
    from protege.students.curve import expected_agreement as on_curve

    try:
        a, b, c = float(fit["a"]), float(fit["b"]), float(fit["c"])
    except (KeyError, TypeError, ValueError):
        return None
    if n <= 0 or not all(math.isfinite(x) for x in (a, b, c)):
        return None
    return on_curve({"a": a, "b": b, "c": c}, float(n))


def _nice(x: float) -> int:
    """Round a label count to two significant figures (7,340 → 7,300), at least 100."""
    x = max(100.0, float(x))
    step = 10 ** max(0, math.floor(math.log10(x)) - 1)
    return int(round(x / step) * step)


def labels_to_buy(curve: dict | None, n_now: int | None, usd_per_label: float | None,
                  factors: tuple[float, ...] = EXTRA_FACTORS) -> list[dict] | None:
    """Expected agreement with the teacher if ``more`` inputs were labelled, from the learning-curve fit.

    ``n_now`` is how many labels the reported student trained on (the fit's own points come from CV folds,
    so they stop below it). ``gain`` is in agreement (0-1), f(n_now + more) - f(n_now)."""
    if not curve or not curve.get("fit") or not n_now:
        return None
    now = expected_agreement(curve["fit"], n_now)
    if now is None:
        return None
    pts = [int(x) for x in curve.get("n") or [] if x]
    top = max(pts + [int(n_now)])
    out = []
    for f in factors:
        more = _nice(f * n_now)
        exp = expected_agreement(curve["fit"], n_now + more)
        if exp is None or any(r["more"] == more for r in out):
            continue
        out.append({"more": more, "n_total": int(n_now + more), "expected_agreement": exp, "gain": exp - now,
                    "usd": None if usd_per_label is None else more * usd_per_label,
                    "extrapolation": round((n_now + more) / top, 2)})
    return out or None


def labels_sentence(buy: list[dict] | None, optimistic: bool = False) -> str:
    """One verdict sentence for doubling the labels (the row with ``more`` closest to n_now); ``optimistic``
    when the fit's plateau was not identified (:func:`fit_note`)."""
    if not buy:
        return ""
    r = min(buy, key=lambda x: abs(x["n_total"] / max(1, x["n_total"] - x["more"]) - 2.0))
    usd = "" if r["usd"] is None else f", {_money(r['usd'])} of teacher calls"
    return (f"Labelling {r['more']:,} more inputs: {r['gain'] * 100:+.1f} points of agreement with the teacher "
            f"expected{usd} (extrapolated from a learning-curve fit on held-out folds — agreement, not gold accuracy"
            f"{'; optimistic: the curve has not levelled off' if optimistic else ''}).")


def _money(x: float) -> str:
    if x == 0 or abs(x) >= 1:
        return f"${x:,.2f}"
    return f"${x:.{max(2, 1 - math.floor(math.log10(abs(x))))}f}"


def per_label_recall(labels: list[str], metrics: dict, rungs: list[dict] | None = None,
                     chosen: str | None = None) -> dict | None:
    """Teacher and student recall per gold label, with the labels where the student falls far behind
    (class balance: a student that learned the prior loses the rare labels first). The chosen rung's
    cross-validated recall against the teacher's labels comes along when train wrote it."""
    t, s = (metrics.get("teacher") or {}).get("per_label"), (metrics.get("student") or {}).get("per_label")
    if not t or not s:
        return None
    cv = next((r.get("per_label_recall_cv") for r in rungs or [] if r.get("name") == chosen), None) or {}
    rows, flagged = {}, []
    for lab in labels:
        tr, sr, n = t[lab]["recall"], s[lab]["recall"], t[lab]["support"]
        missed_more = round((tr - sr) * n)
        flag = bool(n and tr - sr >= RECALL_GAP and missed_more >= RECALL_MIN_MISSED)
        rows[lab] = {"support": n, "teacher": tr, "student": sr, "gap": tr - sr, "student_predicted": s[lab]["predicted"],
                     "student_cv_vs_teacher": cv.get(lab), "flag": flag}
        if flag:
            flagged.append(lab)
    return {"labels": rows, "flagged": flagged,
            "rule": (f"flagged when the student's gold recall is ≥ {RECALL_GAP:.0%} points below the teacher's and it "
                     f"misses ≥ {RECALL_MIN_MISSED} more of that label's gold items")}


def _time_p50(student, texts: list[str], n_single: int = 60) -> float | None:
    from protege.timing import measure

    fn = student.predict_proba if hasattr(student, "predict_proba") else student.predict
    single, _ = measure(fn, texts[:n_single], n_single=n_single, repeats=1, warmup=2)
    return M.latency_summary(single)["p50_ms"]


def _predict(student, texts: list[str], labels: list[str]) -> list:
    if hasattr(student, "predict_proba"):
        return [labels[i] for i in np.asarray(student.predict_proba(texts)).argmax(1)]
    return list(student.predict(texts))


def ladder_block(task: TaskSpec, train_dir: Path, train_stats: dict, texts: list[str], gold: list, t_pred: list,
                 s_items: np.ndarray, s_ms: float | None) -> dict | None:
    """report.json's ``ladder``: each rung on the gold items beside its CV figures from train, or None when
    the student was not chosen by a ladder. ``s_items`` are the chosen student's per-item scores, the
    reference of every rung's paired test."""
    lad = train_stats.get("ladder")
    if not isinstance(lad, dict) or not lad.get("rungs"):
        return None
    kind, chosen = kind_of(task), lad.get("chosen")
    rows = []
    for rung in lad["rungs"]:
        row = {"name": rung.get("name"), "params": rung.get("params"), "cv_agreement": rung.get("cv_agreement"),
               "cv_ci": rung.get("cv_ci"), "ms_p50_train": rung.get("ms_p50"), "size_bytes": rung.get("size_bytes"),
               "train_s": rung.get("train_s"), "eligible": rung.get("eligible"), "chosen": rung.get("name") == chosen,
               "per_label_recall_cv": rung.get("per_label_recall_cv"),
               "score": None, "score_ci": None, "agreement": None, "p_vs_chosen": None, "ms_p50": None}
        folder = train_dir / rung["folder"] if rung.get("folder") else None
        if folder is None or not (folder / "config.json").is_file():
            row["note"] = (f"skipped: {rung['skipped']}" if rung.get("skipped") else
                           f"failed: {rung['error']}"[:300] if rung.get("error") else "no saved model")
            rows.append(row)
            continue
        try:
            student = load_student(folder)
            pred = _predict(student, texts, task.labels)
            items, _ = kind.score(gold, pred, labels=task.labels)
            p, only_rung, only_chosen = M.mcnemar_p(items > 0.5, s_items > 0.5)
            row.update(score=float(items.mean()), score_ci=list(M.bootstrap_ci(items)),
                       agreement=float(np.mean([kind.same_answer(a, b) for a, b in zip(pred, t_pred)])),
                       p_vs_chosen=p, only_rung_right=only_rung, only_chosen_right=only_chosen,
                       ms_p50=_time_p50(student, texts))
        except Exception as e:  # one rung that cannot load (a missing optional extra) must not sink the report
            row["note"] = f"could not be scored: {type(e).__name__}: {e}"[:300]
        rows.append(row)
    return {"chosen": chosen, "why": lad.get("why"), "max_ms": lad.get("max_ms"), "folds": lad.get("folds"),
            "time_budget_s": lad.get("time_budget_s"), "seconds": lad.get("seconds"),
            "curve_skipped": lad.get("curve_skipped"),
            "chosen_ms_p50": s_ms, "rungs": rows, "selected_on": "teacher-labelled held-out folds (never gold)",
            "gold_note": "gold scores are reported for every rung after the choice; they did not take part in it"}


def usd_per_label(task: TaskSpec, cost: dict, teacher_timing: dict) -> tuple[float | None, str]:
    """(teacher $ to label one more input, how it was priced): a local teacher labels in batches, so its
    batched seconds per item × usd_per_hour; an API teacher its mean ledger $ per call; × samples per input."""
    from protege.costs import compute_usd_per_call

    samples = max(1, int(task.teacher.samples or 1))
    batched = teacher_timing.get("batched_ms_per_item")
    if batched:
        usd = compute_usd_per_call(batched / 1000, task.teacher.usd_per_hour)
        basis = "local teacher: batched seconds per item × usd_per_hour"
    else:
        usd = cost.get("teacher_usd_per_call")
        basis = "teacher $ per call (API: mean ledger cost; local: single-item p50 × usd_per_hour)"
    if usd is None or not math.isfinite(usd):
        return None, basis
    return usd * samples, basis + (f" × {samples} samples per input" if samples > 1 else "")


def fit_note(fit: dict) -> str | None:
    """A caveat when the fit's plateau ``a`` sits at its bound of 1: the points never bend, so the plateau is not
    identified and extrapolated gains lean optimistic."""
    a = fit.get("a")
    if a is not None and a >= 0.995:
        return ("the fitted plateau is at 1.0: these points do not show where agreement levels off, so "
                "extrapolated gains are optimistic")
    return None


def learning_curve_block(train_stats: dict, n_now: int | None, usd_per_label: float | None, basis: str) -> tuple:
    """(``learning_curve`` for report.json or None, ``labels_to_buy`` or None)."""
    curve = train_stats.get("learning_curve")
    if not isinstance(curve, dict) or not curve.get("n"):
        return None, None
    n_now = curve.get("n_all_rows") or n_now
    buy = labels_to_buy(curve, n_now, usd_per_label)
    fit = curve.get("fit") or {}
    out = {**curve, "fit_note": fit_note(fit), "n_now": n_now, "expected_now": expected_agreement(fit, n_now or 0),
           "usd_per_label": usd_per_label, "usd_basis": basis,
           "measures": "agreement with the teacher on held-out folds of teacher labels (not gold accuracy)"}
    return out, buy

"""Metric and statistics functions: pure, numpy in / floats out, no I/O.

Every task kind has a *primary* metric that is a mean of per-item scores (classify: accuracy;
extract: per-item field F1; generate: per-item ROUGE-L F). Keeping the primary a per-item mean is
deliberate: the bootstrap CI, the paired student-vs-teacher test, the retained ratio and the
cascade's coverage curve then all resample the same unit — one gold item — and agree with each
other. Corpus-level figures (macro-F1, micro field F1, corpus chrF) are reported beside it with
their own bootstrap CIs.

Bootstrap CIs are percentile intervals over resampled gold items (2,000 resamples, fixed seed, so
a report is reproducible). Teacher and student use the *same* resamples, which makes ratios and
differences paired.
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

import numpy as np

from protege.schema import json_valid, parse_json_object  # noqa: F401  (part of the metrics API)
from protege.stats import (bootstrap_ci, bootstrap_stat_ci, mcnemar_p, paired_bootstrap,  # noqa: F401
                           paired_ratio_ci, paired_test, resample_idx)

# -- classification ----------------------------------------------------------------------------


def accuracy(gold: Sequence[str], pred: Sequence[str | None]) -> float:
    return float(np.mean([g == p for g, p in zip(gold, pred)])) if len(gold) else float("nan")


def confusion(gold: Sequence[str], pred: Sequence[str | None], labels: list[str]) -> list[list[int]]:
    """Rows = gold label, columns = predicted label; one extra last column counts invalid answers."""
    m = np.zeros((len(labels), len(labels) + 1), dtype=int)
    pos = {lab: i for i, lab in enumerate(labels)}
    for g, p in zip(gold, pred):
        m[pos[g], pos.get(p, len(labels))] += 1
    return m.tolist()


def per_label_prf(gold: Sequence[str], pred: Sequence[str | None], labels: list[str]) -> dict[str, dict]:
    """Precision, recall, F1 and support per label (0 where undefined, like sklearn's zero_division=0)."""
    g, p = np.asarray(gold, dtype=object), np.asarray(pred, dtype=object)
    out = {}
    for lab in labels:
        tp = int(((g == lab) & (p == lab)).sum())
        n_pred, n_gold = int((p == lab).sum()), int((g == lab).sum())
        prec = tp / n_pred if n_pred else 0.0
        rec = tp / n_gold if n_gold else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        out[lab] = {"precision": prec, "recall": rec, "f1": f1, "support": n_gold, "predicted": n_pred}
    return out


def macro_f1(gold: Sequence[str], pred: Sequence[str | None], labels: list[str]) -> float:
    """Unweighted mean F1 over the labels that occur in gold or predictions (sklearn's default set)."""
    present = set(gold) | {p for p in pred if p in labels}
    prf = per_label_prf(gold, pred, [lab for lab in labels if lab in present])
    return float(np.mean([v["f1"] for v in prf.values()])) if prf else float("nan")


def macro_f1_ci(gold: Sequence[str], pred: Sequence[str | None], labels: list[str], **kw) -> tuple[float, float]:
    """Bootstrap CI of macro-F1 via confusion counts per resample (fast enough for 2,000 resamples)."""
    pos = {lab: i for i, lab in enumerate(labels)}
    gi = np.array([pos[x] for x in gold])
    pi = np.array([pos.get(x, len(labels)) for x in pred])
    k = len(labels)

    def stat(idx: np.ndarray) -> float:
        cm = np.bincount(gi[idx] * (k + 1) + pi[idx], minlength=k * (k + 1)).reshape(k, k + 1)
        tp = np.diag(cm[:, :k]).astype(float)
        n_gold, n_pred = cm.sum(1), cm[:, :k].sum(0)
        present = (n_gold + n_pred) > 0
        prec = np.divide(tp, n_pred, out=np.zeros(k), where=n_pred > 0)
        rec = np.divide(tp, n_gold, out=np.zeros(k), where=n_gold > 0)
        f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros(k), where=(prec + rec) > 0)
        return float(f1[present].mean())

    return bootstrap_stat_ci(stat, len(gi), **kw)


# -- extraction --------------------------------------------------------------------------------

def flatten_fields(obj: Any, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} → {"a.b": "1"}; values normalised (strings trimmed and case-folded, numbers as
    floats, lists as sorted canonical JSON); null and empty values count as absent fields."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten_fields(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    if obj is None or obj == "" or obj == [] or not key:
        return out
    if isinstance(obj, bool):
        out[key] = str(obj).lower()
    elif isinstance(obj, (int, float)):
        out[key] = repr(float(obj))
    elif isinstance(obj, str):
        out[key] = " ".join(obj.split()).casefold()
    else:
        out[key] = json.dumps(sorted((json.dumps(x, sort_keys=True) for x in obj)) if isinstance(obj, list) else obj,
                              sort_keys=True)
    return out


def field_counts(gold: Any, pred: Any) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) over flattened fields of one item.

    A field counts as right only with the right value; a wrong value is both a false positive
    (the predicted value) and a false negative (the missed gold value). Unparseable output → all
    gold fields are false negatives.
    """
    g = flatten_fields(parse_json_object(gold) or {})
    p = flatten_fields(parse_json_object(pred) or {})
    tp = sum(1 for k, v in p.items() if g.get(k) == v)
    return tp, len(p) - tp, len(g) - tp


def prf_from_counts(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    prec = tp / (tp + fp) if tp + fp else (1.0 if fn == 0 else 0.0)
    rec = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return prec, rec, f1


def exact_match(gold: Any, pred: Any) -> bool:
    """Same set of (flattened, normalised) fields with the same values."""
    p = parse_json_object(pred)
    return p is not None and flatten_fields(parse_json_object(gold) or {}) == flatten_fields(p)


def score_extract(golds: Sequence[Any], preds: Sequence[Any], schema: dict | None = None) -> tuple[np.ndarray, dict]:
    """Per-item field F1 (the primary) and the corpus figures: validity, micro field P/R/F1, exact match."""
    counts = np.array([field_counts(g, p) for g, p in zip(golds, preds)], dtype=float).reshape(-1, 3)
    per_item = np.array([prf_from_counts(*c)[2] for c in counts])
    valid = np.array([json_valid(p, schema) for p in preds], dtype=float)
    em = np.array([exact_match(g, p) for g, p in zip(golds, preds)], dtype=float)
    prec, rec, f1 = prf_from_counts(*counts.sum(0))

    def micro(idx: np.ndarray) -> float:
        return prf_from_counts(*counts[idx].sum(0))[2]

    return per_item, {
        "field_f1": float(per_item.mean()) if len(per_item) else float("nan"),
        "json_validity": float(valid.mean()), "json_validity_ci": list(bootstrap_ci(valid)),
        "exact_match": float(em.mean()), "exact_match_ci": list(bootstrap_ci(em)),
        "field_precision_micro": prec, "field_recall_micro": rec, "field_f1_micro": f1,
        "field_f1_micro_ci": list(bootstrap_stat_ci(micro, len(counts))),
    }


# -- generation --------------------------------------------------------------------------------


def rouge_l(refs: Sequence[str], hyps: Sequence[str]) -> np.ndarray:
    """Per-item ROUGE-L F-measure (Google's ``rouge-score``, Porter stemming)."""
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.array([sc.score(r or "", h or "")["rougeL"].fmeasure for r, h in zip(refs, hyps)], dtype=float)


def chrf_items(refs: Sequence[str], hyps: Sequence[str]) -> np.ndarray:
    """Per-item chrF (sacrebleu, default chrF2), on sacrebleu's 0–100 scale divided by 100."""
    from sacrebleu.metrics import CHRF

    m = CHRF()
    return np.array([m.sentence_score(h or "", [r or ""]).score / 100 for r, h in zip(refs, hyps)], dtype=float)


def chrf_corpus(refs: Sequence[str], hyps: Sequence[str]) -> float:
    from sacrebleu.metrics import CHRF

    return CHRF().corpus_score([h or "" for h in hyps], [[r or "" for r in refs]]).score / 100


def score_generate(refs: Sequence[str], hyps: Sequence[str]) -> tuple[np.ndarray, dict]:
    """Per-item ROUGE-L (the primary) and chrF: sentence-level mean with CI, and corpus-level."""
    rl, ch = rouge_l(refs, hyps), chrf_items(refs, hyps)
    return rl, {"rougeL": float(rl.mean()) if len(rl) else float("nan"), "chrf": float(ch.mean()),
                "chrf_ci": list(bootstrap_ci(ch)), "chrf_corpus": chrf_corpus(refs, hyps)}


def score_classify(gold: Sequence[str], pred: Sequence[str | None], labels: list[str]) -> tuple[np.ndarray, dict]:
    ok = np.array([g == p for g, p in zip(gold, pred)], dtype=float)
    return ok, {"accuracy": float(ok.mean()) if len(ok) else float("nan"), "macro_f1": macro_f1(gold, pred, labels),
                "macro_f1_ci": list(macro_f1_ci(gold, pred, labels)), "per_label": per_label_prf(gold, pred, labels),
                "invalid_answers": int(sum(p not in labels for p in pred))}


# -- fidelity and calibration ------------------------------------------------------------------


def divergences(p_teacher: np.ndarray, q_student: np.ndarray, eps: float = 1e-12) -> dict:
    """Mean forward KL(teacher ‖ student) and Jensen–Shannon divergence, in nats, over items.

    Forward KL is what soft-label distillation minimises; JSD is symmetric and bounded by ln 2, so it
    stays readable when the teacher's distribution is one-hot.
    """
    p = np.clip(np.asarray(p_teacher, dtype=float), eps, 1)
    q = np.clip(np.asarray(q_student, dtype=float), eps, 1)
    p, q = p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
    m = (p + q) / 2
    kl = (p * np.log(p / q)).sum(1)
    jsd = 0.5 * (p * np.log(p / m)).sum(1) + 0.5 * (q * np.log(q / m)).sum(1)
    return {"kl_teacher_student": float(kl.mean()), "kl_ci": list(bootstrap_ci(kl)),
            "jsd": float(jsd.mean()), "jsd_ci": list(bootstrap_ci(jsd)), "n": int(len(p)), "unit": "nats"}


def fit_temperature(logits: np.ndarray, labels: Sequence[int]) -> float:
    """Temperature scaling (Guo et al., 2017): the τ > 0 that minimises the NLL of ``labels`` under
    ``softmax(logits / τ)``. One scalar, so the argmax — and accuracy — never changes; only confidence."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if len(y) == 0:
        return 1.0

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        s = s - s.max(1, keepdims=True)
        return float(-(s[np.arange(len(y)), y] - np.log(np.exp(s).sum(1))).mean())

    return float(np.exp(minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded").x))


def calibration(confidence: Sequence[float], correct: Sequence[float], n_bins: int = 10) -> dict:
    """Expected calibration error (equal-width bins on top-label confidence) and the reliability bins.

    ECE = Σ_b (n_b / n) · |accuracy_b − mean confidence_b| (Guo et al. 2017). The bins are what the
    reliability diagram draws.
    """
    c, y = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(c, edges[1:-1], right=True), 0, n_bins - 1)
    bins, ece, mce = [], 0.0, 0.0
    for b in range(n_bins):
        sel = which == b
        n = int(sel.sum())
        if n:
            gap = abs(float(y[sel].mean()) - float(c[sel].mean()))
            ece += n / len(c) * gap
            mce = max(mce, gap)
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": n,
                     "confidence": float(c[sel].mean()) if n else None, "accuracy": float(y[sel].mean()) if n else None})
    return {"ece": float(ece) if len(c) else float("nan"), "mce": mce, "n_bins": n_bins, "bins": bins,
            "mean_confidence": float(c.mean()) if len(c) else float("nan")}


# -- cascade: coverage vs quality --------------------------------------------------------------


def coverage_curve(confidence: Sequence[float], student: Sequence[float], teacher: Sequence[float]) -> list[dict]:
    """One point per candidate threshold t (answer with the student when confidence ≥ t, else escalate).

    ``selective`` = student quality on the items it answers; ``cascade`` = quality of the whole
    system (student on answered items, teacher on escalated ones). The last point (t above every
    confidence) escalates everything: coverage 0, cascade = teacher.
    """
    c = np.asarray(confidence, dtype=float)
    s, t = np.asarray(student, dtype=float), np.asarray(teacher, dtype=float)
    order = np.argsort(-c, kind="stable")
    cs, ss, ts = c[order], s[order], t[order]
    n = len(c)
    cum_s, cum_t = np.concatenate([[0], np.cumsum(ss)]), np.concatenate([[0], np.cumsum(ts)])
    points = []
    # thresholds at each distinct confidence: covered = all items with conf >= t
    for thr in np.unique(cs)[::-1]:
        k = int(np.searchsorted(-cs, -thr, side="right"))
        points.append({"threshold": float(thr), "coverage": k / n, "selective": float(cum_s[k] / k),
                       "cascade": float((cum_s[k] + cum_t[n] - cum_t[k]) / n)})
    if points:  # full coverage: answer everything, including unseen items less confident than any here
        points[-1]["threshold"] = 0.0
    points.insert(0, {"threshold": float(np.nextafter(max(1.0, cs[0] if n else 1.0), 2.0)), "coverage": 0.0,
                      "selective": None, "cascade": float(cum_t[n] / n) if n else float("nan")})
    return points  # coverage ascending


def choose_threshold(curve: list[dict], teacher_quality: float, target: float = 0.99) -> dict:
    """The point with the most coverage whose cascade quality keeps ``target`` × the teacher's quality."""
    need = target * teacher_quality
    ok = [p for p in curve if p["cascade"] >= need - 1e-12]
    best = max(ok, key=lambda p: (p["coverage"], -p["threshold"])) if ok else curve[0]
    return {**best, "target": target, "teacher_quality": teacher_quality, "needed": need}


def thin_curve(curve: list[dict], max_points: int = 101) -> list[dict]:
    """Keep report.json small: at most ~max_points points, evenly spaced in coverage, ends kept."""
    if len(curve) <= max_points:
        return curve
    keep = {0, len(curve) - 1}
    cov = np.array([p["coverage"] for p in curve])
    for g in np.linspace(0, 1, max_points):
        keep.add(int(np.argmin(np.abs(cov - g))))
    return [curve[i] for i in sorted(keep)]


# -- speed -------------------------------------------------------------------------------------


def latency_summary(seconds: Sequence[float]) -> dict:
    """p50 / p95 / mean of per-call wall times, in milliseconds."""
    x = np.asarray([s for s in seconds if s is not None and not math.isnan(s)], dtype=float) * 1000
    if not len(x):
        return {"p50_ms": None, "p95_ms": None, "mean_ms": None, "n": 0}
    return {"p50_ms": float(np.median(x)), "p95_ms": float(np.quantile(x, 0.95)), "mean_ms": float(x.mean()),
            "n": int(len(x))}

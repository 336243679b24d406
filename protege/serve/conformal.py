"""Gates with a stated guarantee: the cascade threshold by learn-then-test, the OOD distance by a conformal quantile.

**Risk gate.** The student answers when its confidence ≥ t. Its *risk* at t is the share of answered items on which
it disagrees with the teacher. Given a calibration set of teacher-labelled items the scoring model never trained on
(the ladder's out-of-fold probabilities, ``train/calibration.npz``), :func:`risk_gate` returns the lowest t such that

    P( risk(t) ≤ ε ) ≥ 1 − δ        (over the draw of the calibration set)

by learn-then-test (Angelopoulos et al. 2021) with fixed-sequence testing: thresholds on a grid fixed in advance
are tested from high to low; H_t: "risk(t) > ε" is rejected when the binomial p-value P(Binom(n_t, ε) ≤ k_t) is
≤ the level (n_t answered calibration items, k_t of them wrong — given n_t, the answered items are an i.i.d.
sample of the items the gate answers, so k_t ~ Binom(n_t, risk(t))); a scan stops at the first threshold it cannot
reject, and every threshold it passed is certified at family-wise level. Thresholds answering fewer items than the
scan's start are skipped, not failed: they form a prefix (the answered sets are nested), and without the skip a
single unlucky error among the few most confident items would end the scan at once.

Two scans run at δ/2 each (Bonferroni), and the lower certified threshold wins: one starts early (≥ min(10/ε, n/10)
answered items), for risk curves that rise steeply as the threshold falls; one late (≥ min(40/ε, n/2)), with the
power to certify flat curves sitting a little under ε — measured on the suite, a static student's disagreement with
a simulated 90%-right teacher is ~2% (the teacher's own random slips) from its most confident items down to half
of traffic, where a single early scan stops at its first test. When neither scan passes a threshold, nothing is
certified: the threshold is +inf and every request escalates (``feasible: false``). The resampling test
(``tests/test_conformal.py``) checks the promise holds with the data-dependent starts.

Why binomial and not Hoeffding: the loss is 0/1, so the exact binomial tail is the tightest valid p-value;
Clopper–Pearson's upper bound at the chosen t is reported alongside (it is < ε exactly when the test rejects).

**OOD gate.** :func:`ood_threshold` is the split-conformal quantile of held-out in-distribution distances: a fresh
in-distribution input has distance above it with probability ≤ α (exactly, for exchangeable data).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import beta, binom


def default_grid() -> np.ndarray:
    """Candidate thresholds, high to low, fixed before any data is seen (fine near 1: softmax confidences pile up there)."""
    g = np.concatenate([np.linspace(0.0, 1.0, 401), 1.0 - np.geomspace(1e-7, 0.05, 160)])
    return np.unique(np.clip(g, 0.0, 1.0))[::-1]


@dataclass
class RiskGate:
    """The certified threshold and what it rests on (all counts on the calibration set)."""

    threshold: float      # +inf: nothing certified, every request escalates
    risk: float           # ε promised
    delta: float          # δ
    n_cal: int
    n_answered: int
    errors: int
    coverage: float       # share of calibration items answered at the threshold
    upper_bound: float | None  # one-sided (1 − δ/2) Clopper–Pearson bound on the risk at the threshold
    feasible: bool
    method: str = "learn-then-test: two fixed-sequence binomial scans at delta/2 each"

    def to_json(self) -> dict:
        d = asdict(self)
        d["threshold"] = None if not math.isfinite(self.threshold) else float(self.threshold)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "RiskGate":
        d = dict(d)
        d["threshold"] = math.inf if d.get("threshold") is None else float(d["threshold"])
        return cls(**d)


def cp_upper(k: int, n: int, delta: float) -> float:
    """One-sided (1 − δ) Clopper–Pearson upper bound on a rate with k events in n trials."""
    return 1.0 if k >= n else float(beta.ppf(1.0 - delta, k + 1, n - k))


def min_answered(risk: float, delta: float) -> int:
    """Fewest answered items for which zero errors rejects "risk > ε" at level δ: (1 − ε)^m ≤ δ."""
    return max(1, math.ceil(math.log(delta) / math.log1p(-risk)))


def risk_gate(confidence, correct, risk: float, delta: float, grid: np.ndarray | None = None) -> RiskGate:
    """The lowest threshold whose disagreement among answered items is ≤ ``risk`` with probability ≥ 1 − ``delta``.

    ``confidence``: the gate's score per calibration item (NaN: not scored, dropped); ``correct``: 1 when the student
    agreed with the teacher on it.
    """
    if not 0 < risk < 1 or not 0 < delta < 1:
        raise ValueError(f"risk and delta must be in (0, 1); got risk={risk}, delta={delta}")
    c = np.asarray(confidence, dtype=float)
    ok = np.asarray(correct, dtype=float)
    keep = np.isfinite(c)
    c, ok = c[keep], ok[keep]
    n = len(c)
    grid = default_grid() if grid is None else np.sort(np.asarray(grid, dtype=float))[::-1]
    order = np.argsort(-c, kind="stable")
    cs, wrong = c[order], np.concatenate([[0], np.cumsum(1.0 - ok[order])])
    m = np.searchsorted(-cs, -grid, side="right")  # items with confidence ≥ t, per grid point (high t first)
    k = np.round(wrong[m]).astype(int)
    d = delta / 2  # two scans (Bonferroni): an early start for steep risk curves, a late one for flat ones
    floor = min_answered(risk, d)
    best = None
    for start in (max(floor, min(n // 10, math.ceil(10 / risk))), max(floor, min(n // 2, math.ceil(40 / risk)))):
        # thresholds answering fewer items than the start are skipped: a prefix of the scan (the answered sets
        # are nested), so the scan starts where the test has power instead of stopping at its first coin flip
        testable = m >= start
        p = np.where(testable, binom.cdf(k, np.maximum(m, 1), risk), 0.0)
        fails = np.flatnonzero(testable & (p > d))
        stop = fails[0] if len(fails) else len(grid)
        passed = np.flatnonzero(testable[:stop])
        if len(passed) and (best is None or grid[passed[-1]] < best[0]):
            j = passed[-1]
            best = (float(grid[j]), int(m[j]), int(k[j]))
    if best is None:
        return RiskGate(math.inf, risk, delta, n, 0, 0, 0.0, None, False)
    t, m, k = best
    return RiskGate(t, risk, delta, n, m, k, m / n, cp_upper(k, m, delta / 2), True)


def realised(confidence, correct, threshold: float) -> dict:
    """Coverage and disagreement among answered items at ``threshold`` on another sample (gold, shadow traffic)."""
    c = np.asarray(confidence, dtype=float)
    ok = np.asarray(correct, dtype=float)
    ans = np.isfinite(c) & (c >= threshold)
    m = int(ans.sum())
    return {"n": int(len(c)), "n_answered": m, "coverage": m / len(c) if len(c) else None,
            "risk": float(1.0 - ok[ans].mean()) if m else None}


def gate_from_probs(probs: np.ndarray, teacher: np.ndarray, risk: float, delta: float) -> RiskGate:
    """The gate for a calibration set stored as (probabilities, teacher label index) — ``calibration.npz``'s shape."""
    P = np.asarray(probs, dtype=float)
    seen = np.isfinite(P).all(1)
    conf = np.where(seen, np.nan_to_num(P).max(1), np.nan)
    correct = np.nan_to_num(P).argmax(1) == np.asarray(teacher)
    return risk_gate(conf, correct, risk, delta)


# -- OOD --------------------------------------------------------------------------------------------------------

def _unit(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def nearest_distance(X: np.ndarray, ref: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Cosine distance from each row of X to its nearest row of ``ref`` (both raw embeddings)."""
    A, B = _unit(X), _unit(ref)
    out = np.empty(len(A), dtype=np.float32)
    for i in range(0, len(A), chunk):
        out[i:i + chunk] = 1.0 - (A[i:i + chunk] @ B.T).max(1)
    return out


def ood_threshold(held_out: np.ndarray, alpha: float) -> float:
    """Split-conformal quantile: ⌈(n+1)(1−α)⌉-th smallest held-out distance (+inf when n is too small for α)."""
    d = np.sort(np.asarray(held_out, dtype=float))
    n = len(d)
    r = math.ceil((n + 1) * (1 - alpha))
    return float(d[r - 1]) if 1 <= r <= n else math.inf


def fit_ood(X: np.ndarray, alpha: float, held_out: float = 0.2, seed: int = 0) -> dict:
    """Calibrate the OOD gate on training inputs: a random ``held_out`` share is scored against the rest.

    The gateway then measures distance to *all* training inputs, which can only be smaller than to the reference
    part: the false-escalation rate on in-distribution traffic stays ≤ α.
    """
    X = np.asarray(X, dtype=np.float32)
    n = len(X)
    perm = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n * held_out)))
    cal, ref = perm[:k], perm[k:]
    if len(ref) == 0:
        raise ValueError(f"the OOD gate needs at least 2 training inputs; got {n}")
    thr = ood_threshold(nearest_distance(X[cal], X[ref]), alpha)
    return {"threshold": thr, "alpha": alpha, "n_reference": int(n), "n_calibration": int(k),
            "distance": "cosine distance to the nearest training input"}

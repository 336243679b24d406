"""Uncertainty for every number in a report: bootstrap confidence intervals and paired tests.

Teacher and student are always scored on the same gold items, so their comparison is paired: McNemar's
exact test for right/wrong items, a paired bootstrap for graded scores, and a paired ratio CI for
"% of the teacher's quality retained". Pure functions, numpy in, floats out.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


# -- bootstrap ---------------------------------------------------------------------------------


def resample_idx(n: int, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """[n_boot, n] indices of bootstrap resamples of n items (same seed → same resamples)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    a = (1 - level) / 2
    return float(np.quantile(samples, a)), float(np.quantile(samples, 1 - a))


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-item scores (0/1 or real), vectorised."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return (float("nan"), float("nan"))
    return _interval(x[resample_idx(len(x), n_boot, seed)].mean(1), level)


def bootstrap_stat_ci(stat: Callable[[np.ndarray], float], n: int, n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of any statistic of the items; ``stat(idx)`` scores one resample of item indices.

    For corpus-level metrics that are not a mean of per-item scores (macro-F1, micro-F1, corpus chrF).
    """
    if n == 0:
        return (float("nan"), float("nan"))
    vals = np.array([stat(idx) for idx in resample_idx(n, n_boot, seed)], dtype=float)
    return _interval(vals[~np.isnan(vals)], level) if (~np.isnan(vals)).any() else (float("nan"), float("nan"))


def paired_ratio_ci(num: Sequence[float], den: Sequence[float], n_boot: int = 2000, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float]:
    """CI of mean(num) / mean(den) with the same resamples for both (e.g. retained = student / teacher)."""
    a, b = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    idx = resample_idx(len(a), n_boot, seed)
    return _interval(a[idx].mean(1) / np.maximum(b[idx].mean(1), 1e-12), level)


# -- paired tests ------------------------------------------------------------------------------


def mcnemar_p(a_ok: Sequence[bool], b_ok: Sequence[bool]) -> tuple[float, int, int]:
    """Exact (binomial) McNemar test on paired right/wrong outcomes: (two-sided p, b, c).

    b = items only ``a`` got right, c = items only ``b`` got right. Under H0 (equal accuracy) the
    discordant items split 50/50; exact rather than chi-square because b + c is often small.
    """
    from scipy.stats import binom

    a, bb = np.asarray(a_ok, dtype=bool), np.asarray(b_ok, dtype=bool)
    b, c = int((a & ~bb).sum()), int((~a & bb).sum())
    if b + c == 0:
        return 1.0, b, c
    return float(min(1.0, 2 * binom.cdf(min(b, c), b + c, 0.5))), b, c


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Mean difference a − b over the same items, its CI, and a two-sided bootstrap p-value.

    p is the share of resampled differences, re-centred on 0 (H0: no difference), at least as far
    from 0 as the observed one (Efron & Tibshirani 1993, §16.4).
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) == 0:
        return {"diff": float("nan"), "diff_ci": [float("nan")] * 2, "p_value": float("nan")}
    boot = d[resample_idx(len(d), n_boot, seed)].mean(1)
    obs = float(d.mean())
    extreme = int(np.sum(np.abs(boot - obs) >= abs(obs) - 1e-12))
    p = 1.0 if obs == 0 else (1 + extreme) / (1 + n_boot)  # never exactly 0 from a finite resample
    return {"diff": obs, "diff_ci": list(_interval(boot, level)), "p_value": float(min(1.0, p))}


def paired_test(a: Sequence[float], b: Sequence[float], binary: bool) -> dict:
    """The paired comparison the report shows: McNemar for right/wrong items, paired bootstrap otherwise."""
    out = paired_bootstrap(a, b)
    out["test"] = "paired bootstrap"
    if binary:
        p, n_a, n_b = mcnemar_p(np.asarray(a) > 0.5, np.asarray(b) > 0.5)
        out.update(test="McNemar (exact)", p_value=p, only_first_right=n_a, only_second_right=n_b,
                   bootstrap_p_value=out["p_value"])
    return out



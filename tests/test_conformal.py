"""The risk gate's guarantee, checked by resampling: P(realised risk > ε) ≤ δ over calibration draws.

A synthetic task with a known population: each item has a confidence and a chance the student agrees with the
teacher that rises with it, but is miscalibrated (over-confident). The plug-in rule (lowest threshold whose
calibration risk is ≤ ε) breaks the promise far more often than δ; the learn-then-test gate keeps it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from protege.serve.conformal import (
    cp_upper,
    fit_ood,
    gate_from_probs,
    nearest_distance,
    ood_threshold,
    realised,
    risk_gate,
)


def population(n: int = 200_000, seed: int = 0):
    rng = np.random.default_rng(seed)
    conf = rng.beta(8, 1, n)
    p_agree = np.clip((conf - 0.3) / 0.7, 0.0, 1.0) ** 1.5  # over-confident: agreement below confidence
    return conf, (rng.random(n) < p_agree).astype(float)


@pytest.mark.parametrize("eps,delta", [(0.05, 0.1), (0.1, 0.2)])
def test_realised_risk_exceeds_eps_in_at_most_delta_of_resamples(eps, delta):
    conf, ok = population()
    rng = np.random.default_rng(1)
    reps, n_cal, over, feasible, naive_over = 300, 2000, 0, 0, 0
    order = np.argsort(-conf)
    cs, wrong = conf[order], np.concatenate([[0], np.cumsum(1 - ok[order])])

    def true_risk(t):  # the population is the truth: risk among all items answered at t
        m = int(np.searchsorted(-cs, -t, side="right"))
        return wrong[m] / m if m else 0.0

    for _ in range(reps):
        cal = rng.choice(len(conf), n_cal, replace=False)
        g = risk_gate(conf[cal], ok[cal], eps, delta)
        if g.feasible:
            feasible += 1
            over += true_risk(g.threshold) > eps
        o = np.argsort(-conf[cal])
        emp = np.cumsum(1 - ok[cal][o]) / np.arange(1, n_cal + 1)  # calibration risk answering the top m items
        naive_over += true_risk(conf[cal][o][np.flatnonzero(emp <= eps).max()]) > eps  # plug-in: no margin
    slack = 3 * math.sqrt(delta * (1 - delta) / reps)
    assert feasible >= reps * 0.8  # the gate is not vacuous on this task
    assert over / reps <= delta + slack, (over, reps)
    assert naive_over / reps > delta + slack  # the plug-in rule breaks the promise: this test can fail


def test_the_gate_is_not_needlessly_conservative():
    conf, ok = population()
    rng = np.random.default_rng(2)
    # the lowest threshold with population risk ≤ ε answers this much; the gate gets a good part of it on average
    best = max(realised(conf, ok, t)["coverage"] for t in np.linspace(0.5, 1, 501)
               if (realised(conf, ok, t)["risk"] or 0) <= 0.05)
    gates = [risk_gate(conf[cal], ok[cal], 0.05, 0.1) for cal in (rng.choice(len(conf), 2000, replace=False)
                                                                  for _ in range(20))]
    assert 0.4 * best <= np.mean([g.coverage for g in gates]) <= best + 0.05
    for g in gates:
        if g.feasible:
            assert g.upper_bound <= 0.05 and g.upper_bound == pytest.approx(cp_upper(g.errors, g.n_answered, 0.05))


def test_a_flat_risk_curve_under_eps_is_certified_deep():
    """Disagreement ~2% everywhere (a teacher's random slips): the late scan certifies most of the traffic, where an
    early single scan would stop at its first unlucky test."""
    rng = np.random.default_rng(3)
    conf, ok = rng.random(1000), (rng.random(1000) > 0.02).astype(float)
    g = risk_gate(conf, ok, 0.05, 0.1)
    assert g.feasible and g.coverage >= 0.7


def test_infeasible_when_no_threshold_can_be_certified():
    g = risk_gate(np.full(30, 0.99), np.r_[np.ones(27), np.zeros(3)], 0.01, 0.05)
    assert not g.feasible and math.isinf(g.threshold) and g.to_json()["threshold"] is None
    assert realised([0.99, 0.5], [1, 0], g.threshold)["n_answered"] == 0
    with pytest.raises(ValueError, match="risk and delta"):
        risk_gate([0.5], [1], 0.0, 0.1)


def test_gate_from_the_calibration_npz_shape_drops_unscored_rows():
    P = np.array([[0.9, 0.1], [np.nan, np.nan]] * 200 + [[0.2, 0.8]] * 10, dtype=np.float32)
    teacher = np.array([0, 1] * 200 + [1] * 10)
    g = gate_from_probs(P, teacher, 0.05, 0.1)
    assert g.n_cal == 210 and g.feasible and g.errors == 0


def test_ood_threshold_is_a_conformal_quantile_and_flags_far_inputs():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 32))
    X = np.repeat(centres, 200, 0) + 0.3 * rng.normal(size=(1000, 32))
    gate = fit_ood(X, alpha=0.05)
    fresh = np.repeat(centres, 100, 0) + 0.3 * rng.normal(size=(500, 32))
    far = rng.normal(size=(50, 32))
    d_fresh, d_far = nearest_distance(fresh, X), nearest_distance(far, X)
    assert (d_fresh > gate["threshold"]).mean() <= 0.05 + 0.03
    assert (d_far > gate["threshold"]).mean() >= 0.95
    assert ood_threshold(np.arange(10.0), 0.01) == math.inf  # too few held-out items for α = 1%
    assert ood_threshold(np.arange(100.0), 0.1) == 90.0

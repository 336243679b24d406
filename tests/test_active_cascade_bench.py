"""bench/active_cascade.py's cascade arithmetic: one level, a chain of two, and the shipped-student table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import active_cascade as ac  # noqa: E402


def test_chain_coverage_uses_the_second_level_where_the_first_is_unsure():
    # 100 items, teacher right on 90. Level 1 is sure and right on the first 50, unsure and wrong on the rest;
    # level 2 is sure and right on items 50-89, unsure and wrong on 90-99 (where the teacher is wrong too).
    t_right = np.r_[np.ones(90), np.zeros(10)]
    c1 = np.r_[np.full(50, 0.99), np.full(50, 0.4)]
    r1 = np.r_[np.ones(50), np.zeros(50)]
    c2 = np.r_[np.full(50, 0.3), np.full(40, 0.95), np.full(10, 0.5)]
    r2 = np.r_[np.zeros(50), np.ones(40), np.zeros(10)]
    chain, alone = ac.chain_coverage(c1, r1, c2, r2, t_right)
    # answering everything costs nothing here: the last 10 are wrong whoever answers
    assert chain == 1.0
    # level 2 alone cannot answer the first 50 (wrong there) without losing accuracy: 50 of 100 at most
    assert alone == 0.5


def test_chain_coverage_refuses_what_loses_accuracy():
    t_right = np.ones(20)
    c = np.linspace(0.5, 1.0, 20)
    r = (c > 0.9).astype(float)  # right only where surest
    chain, alone = ac.chain_coverage(c, r, c, r, t_right)
    assert 0 < chain <= (c > 0.9).mean() + 1e-9
    assert alone <= (c > 0.9).mean() + 1e-9


def test_cascade_measures_gate_and_coverage():
    rng = np.random.default_rng(0)
    labels = ["a", "b"]
    n = 400
    y = rng.integers(0, 2, n)
    sure = rng.random(n) < 0.7
    # sure items: right with p 0.99 at 0.98 confidence; unsure: coin flips at 0.55
    pred = np.where(sure, np.where(rng.random(n) < 0.99, y, 1 - y), rng.integers(0, 2, n))
    conf = np.where(sure, 0.98, 0.55)
    P = np.zeros((n, 2))
    P[np.arange(n), pred] = conf
    P[np.arange(n), 1 - pred] = 1 - conf
    gold_y = [labels[i] for i in y]
    a = argparse.Namespace(risk=0.05, delta=0.1)
    m = ac.cascade_measures(P, P, gold_y, gold_y, np.ones(n), labels, y, a)
    assert m["gate_feasible"]
    assert abs(m["gate_cov"] - sure.mean()) < 1e-9  # the gate answers exactly the sure items
    assert m["gate_risk"] < 0.05
    assert 0.0 < m["cov"] <= sure.mean() + 1e-9


def test_table_has_the_shipped_student_block():
    a = argparse.Namespace(frozen=False, budget=1500, risk=0.05, delta=0.1)
    row = {"task": "t", "labels": 3, "teacher_acc": 0.9, "random_final": 0.8, "dev": 100, "random_calls": 900,
           "active_calls": 600, "budget": 1500, "cov_gold_pick": 0.5, "gate_feasible": False, "gate_cov": None,
           "gate_risk": None, "gate_rel_acc": 1.0, "auto_cov": 0.84, "auto_chain_cov": 0.86, "auto_rung": "frozen",
           "auto_n": 3768, "auto_acc": 0.827, "auto_gate_feasible": True, "auto_gate_cov": 0.56, "auto_gate_risk": 0.05,
           "auto_gate_rel_acc": 1.01}
    out = ac.table([row], a)
    assert "| t | 3768 | frozen | 0.827 (0.900) | 84.0% | 86.0% | 56.0% / 5.0% / 1.010 |" in out
    assert "600 (40%)" in out


def test_rule_alternatives_pick_what_they_claim():
    from bench import active_rules as ar

    rng = np.random.default_rng(0)
    n = 200
    E = rng.normal(size=(n, 8))
    sure = np.tile([0.98, 0.01, 0.01], (n, 1))
    P = sure.copy()
    unsure = np.arange(0, n, 3)  # 67 unsure rows (more than the 5 x 10 k-means looks at), spread over the embedding
    P[unsure] = [0.4, 0.35, 0.25]
    for pick in (ar.entropy(P, 10), ar.kmeans(P, E, 10)):
        assert len(pick) == len(set(pick)) == 10
        assert set(pick) <= set(unsure.tolist())
    # BADGE: D² sampling on gradient embeddings — sure rows sit near the origin, so once far (unsure) centres are
    # chosen they are at distance ~|g_centre| and can be drawn too, but the first pick and most picks are unsure
    pick = ar.badge(P, E, 10)
    assert len(set(pick)) == 10 and pick[0] in unsure and len(set(pick) & set(unsure.tolist())) >= 5
    half = ar.mix(P, E, 10)
    assert len(set(half)) == 10 and len(set(half) & set(unsure.tolist())) >= 5
    # cal: the input whose prediction contradicts its labelled neighbours' comes first
    EL, PL = E[:5], sure[:5]
    Pc = sure.copy()
    Pc[50] = [0.05, 0.9, 0.05]
    assert ar.cal(Pc, E, PL, EL, 1) == [50]

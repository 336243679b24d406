"""Metric and statistics functions against hand-computed cases and reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from protege.kinds import score_items
from protege import metrics as M

# -- classification ----------------------------------------------------------------------------

G = ["a", "a", "b", "b", "c"]
P = ["a", "b", "b", "b", None]


def test_classification_by_hand():
    assert M.accuracy(G, P) == pytest.approx(3 / 5)
    prf = M.per_label_prf(G, P, ["a", "b", "c"])
    assert prf["a"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2, "predicted": 1})
    assert prf["b"]["precision"] == pytest.approx(2 / 3) and prf["b"]["recall"] == 1.0 and prf["b"]["f1"] == pytest.approx(0.8)
    assert prf["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1, "predicted": 0}
    assert M.macro_f1(G, P, ["a", "b", "c"]) == pytest.approx((2 / 3 + 0.8 + 0) / 3)
    assert M.confusion(G, P, ["a", "b", "c"]) == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1]]
    items, m = score_items("classify", G, P, labels=["a", "b", "c"])
    assert items.tolist() == [1, 0, 1, 1, 0] and m["invalid_answers"] == 1 and m["accuracy"] == pytest.approx(0.6)


def test_macro_f1_matches_sklearn_and_its_ci_brackets_it():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(1)
    labels = ["x", "y", "z", "w"]
    g = list(rng.choice(labels, 300, p=[0.5, 0.3, 0.15, 0.05]))
    p = [x if rng.random() < 0.7 else rng.choice(labels[:3]) for x in g]  # "w" is never predicted
    assert M.macro_f1(g, p, labels) == pytest.approx(f1_score(g, p, average="macro", zero_division=0))
    lo, hi = M.macro_f1_ci(g, p, labels)
    assert lo < M.macro_f1(g, p, labels) < hi and hi - lo < 0.3


# -- paired tests ------------------------------------------------------------------------------


def test_mcnemar_exact_by_hand():
    a = [1] * 1 + [0] * 9 + [1] * 20   # a alone right on 1 item
    b = [0] * 1 + [1] * 9 + [1] * 20   # b alone right on 9
    p, n_a, n_b = M.mcnemar_p(a, b)
    assert (n_a, n_b) == (1, 9)
    assert p == pytest.approx(2 * (1 + 10) / 2**10)  # 2 · P(X ≤ 1), X ~ Bin(10, ½)
    assert M.mcnemar_p([1, 0, 1], [1, 0, 1])[0] == 1.0
    assert M.mcnemar_p([1, 0], [0, 1])[0] == 1.0


def test_paired_bootstrap_detects_real_difference_only():
    same = M.paired_bootstrap([1, 0, 1, 1], [1, 0, 1, 1])
    assert same["diff"] == 0 and same["p_value"] == 1.0
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, 200)
    big = M.paired_bootstrap(x + 0.5, x + rng.normal(0, 0.1, 200))
    assert big["p_value"] < 0.01 and big["diff_ci"][0] > 0.3
    null = [M.paired_bootstrap(rng.normal(0, 1, 60), rng.normal(0, 1, 60), n_boot=400, seed=s)["p_value"] for s in range(60)]
    assert 0.01 <= np.mean(np.array(null) < 0.05) <= 0.15  # ~5% false positives under H0
    t = M.paired_test([1, 1, 1, 0], [0, 0, 1, 0], binary=True)
    assert t["test"].startswith("McNemar") and t["only_first_right"] == 2 and t["only_second_right"] == 0


# -- bootstrap CIs -----------------------------------------------------------------------------


def test_bootstrap_ci_covers_true_mean_about_95_percent():
    rng = np.random.default_rng(42)
    p, n, reps = 0.7, 120, 300
    hits = 0
    for r in range(reps):
        lo, hi = M.bootstrap_ci(rng.random(n) < p, n_boot=800, seed=r)
        hits += lo <= p <= hi
    assert 0.90 <= hits / reps <= 0.985
    lo50, hi50 = M.bootstrap_ci(rng.random(n) < p, level=0.5)
    lo95, hi95 = M.bootstrap_ci(rng.random(n) < p, level=0.95)
    assert hi50 - lo50 < hi95 - lo95


def test_paired_ratio_ci_brackets_the_ratio():
    rng = np.random.default_rng(3)
    t = (rng.random(400) < 0.8).astype(float)
    s = np.where(rng.random(400) < 0.9, t, 1 - t)
    lo, hi = M.paired_ratio_ci(s, t)
    assert lo < s.mean() / t.mean() < hi


# -- calibration, fidelity, cascade ------------------------------------------------------------


def test_ece_by_hand_and_on_calibrated_data():
    c = M.calibration([0.95, 0.95, 0.15, 0.15], [1, 0, 0, 0], n_bins=10)
    assert c["ece"] == pytest.approx(0.5 * 0.45 + 0.5 * 0.15)
    assert c["mce"] == pytest.approx(0.45)
    assert c["bins"][9]["n"] == 2 and c["bins"][9]["accuracy"] == 0.5 and c["bins"][1]["confidence"] == pytest.approx(0.15)
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.2, 1.0, 20000)
    assert M.calibration(conf, rng.random(20000) < conf)["ece"] < 0.02
    assert M.calibration(conf, rng.random(20000) < conf ** 3)["ece"] > 0.1  # over-confident


def test_divergences_by_hand():
    same = M.divergences(np.array([[0.2, 0.8]]), np.array([[0.2, 0.8]]))
    assert same["kl_teacher_student"] == pytest.approx(0, abs=1e-9) and same["jsd"] == pytest.approx(0, abs=1e-9)
    d = M.divergences(np.array([[1.0, 0.0]]), np.array([[0.5, 0.5]]))
    assert d["kl_teacher_student"] == pytest.approx(math.log(2), abs=1e-6)
    jsd = 0.5 * math.log(1 / 0.75) + 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    assert d["jsd"] == pytest.approx(jsd, abs=1e-6)
    from scipy.spatial.distance import jensenshannon

    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(5), 50), rng.dirichlet(np.ones(5), 50)
    assert M.divergences(p, q)["jsd"] == pytest.approx(np.mean([jensenshannon(a, b) ** 2 for a, b in zip(p, q)]))


def test_coverage_curve_and_threshold_by_hand():
    conf = [0.9, 0.8, 0.7, 0.6]
    student, teacher = [1, 1, 0, 0], [1, 0, 1, 1]
    curve = M.coverage_curve(conf, student, teacher)
    got = [(p["coverage"], p["selective"], p["cascade"]) for p in curve]
    assert got == [(0.0, None, 0.75), (0.25, 1.0, 0.75), (0.5, 1.0, 1.0), (0.75, pytest.approx(2 / 3), 0.75), (1.0, 0.5, 0.5)]
    assert curve[-1]["threshold"] == 0.0 and curve[0]["threshold"] > 1.0  # answer all / escalate all
    pick = M.choose_threshold(curve, teacher_quality=0.75, target=0.99)
    assert (pick["threshold"], pick["coverage"]) == (0.7, 0.75)
    pick = M.choose_threshold(curve, teacher_quality=0.75, target=1.2)
    assert (pick["threshold"], pick["coverage"]) == (0.8, 0.5)
    assert M.choose_threshold(curve, 0.75, target=2.0)["coverage"] == 0.0
    assert len(M.thin_curve(M.coverage_curve(np.linspace(0, 1, 1000), np.ones(1000), np.ones(1000)), 51)) <= 53


# -- extraction --------------------------------------------------------------------------------

GOLD = {"name": "Ann", "total": 12.5, "addr": {"city": "Paris"}, "note": None}
PRED = '```json\n{"name": " ann ", "total": 12.50, "addr": {"city": "Lyon"}, "extra": 1}\n```'


def test_extract_fields_by_hand():
    assert M.flatten_fields(GOLD) == {"name": "ann", "total": "12.5", "addr.city": "paris"}
    assert M.field_counts(GOLD, PRED) == (2, 2, 1)
    assert M.prf_from_counts(2, 2, 1) == pytest.approx((0.5, 2 / 3, 4 / 7))
    assert not M.exact_match(GOLD, PRED)
    assert M.exact_match(GOLD, '{"addr": {"city": "PARIS"}, "total": 12.5, "name": "Ann"}')
    assert M.json_valid(PRED) and not M.json_valid("not json") and not M.json_valid("[1, 2]")
    schema = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
    assert M.json_valid('{"name": "x"}', schema) and not M.json_valid('{"total": 1}', schema)
    items, m = score_items("extract", [GOLD, GOLD], [PRED, "not json"])
    assert items.tolist() == pytest.approx([4 / 7, 0.0])
    assert m["json_validity"] == 0.5 and m["exact_match"] == 0.0
    assert (m["field_precision_micro"], m["field_recall_micro"]) == pytest.approx((0.5, 2 / 6))
    assert m["field_f1"] == pytest.approx(2 / 7)


# -- generation --------------------------------------------------------------------------------


def test_generate_metrics_by_hand():
    rl = M.rouge_l(["the cat sat on the mat", "abc"], ["the cat on the mat", "abc"])
    assert rl[0] == pytest.approx(2 * 1 * (5 / 6) / (1 + 5 / 6)) and rl[1] == 1.0
    ch = M.chrf_items(["hello world", "hello world"], ["hello world", "zzzz qqqq"])
    assert ch[0] == pytest.approx(1.0) and ch[1] == pytest.approx(0.0)
    from sacrebleu.metrics import CHRF

    refs, hyps = ["a quick brown fox", "jumps over"], ["a quick brown dog", "jumped over"]
    assert M.chrf_corpus(refs, hyps) == pytest.approx(CHRF().corpus_score(hyps, [refs]).score / 100)
    items, m = score_items("generate", refs, hyps)
    assert m["rougeL"] == pytest.approx(items.mean()) and 0 < m["chrf"] < 1 and len(m["rougeL_ci"]) == 2
    with pytest.raises(ValueError, match="unknown task kind"):
        score_items("translate", [], [])


def test_latency_summary():
    s = M.latency_summary([0.001, 0.002, 0.003, None])
    assert s["p50_ms"] == pytest.approx(2.0) and s["n"] == 3 and s["p95_ms"] == pytest.approx(2.9)
    assert M.latency_summary([])["p50_ms"] is None


def test_fit_temperature_recovers_a_known_overconfidence():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6000, 4)) * 2.0
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(4, p=row) for row in p])  # labels drawn from softmax(z): z is calibrated
    assert M.fit_temperature(z * 3.0, y) == pytest.approx(3.0, rel=0.08)  # 3x too sharp → τ ≈ 3
    assert M.fit_temperature(z / 2.0, y) == pytest.approx(0.5, rel=0.08)  # too flat → τ ≈ 0.5
    assert M.fit_temperature(np.zeros((0, 4)), []) == 1.0

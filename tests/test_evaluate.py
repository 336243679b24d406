"""evaluate on a tiny finished run (hand-set student, written teacher answers) and --compare on two runs."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from evalrun import expected_accuracy, make_run
from protege.reporting.compare import compare_runs
from protege.stages.evaluate import evaluate
from protege.task import load_task

CONTRACT = {"task", "kind", "metric", "n_eval", "teacher", "student", "retained", "speedup"}
TEACHER_KEYS = {"name", "score", "score_ci", "ms_per_item", "usd_per_1k"}
STUDENT_KEYS = {"name", "score", "score_ci", "agreement", "ms_per_item", "usd_per_1k", "params"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs on the same gold items: student A (fooled by the decoy word) and B (not fooled)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, decoy in (("a", "blue"), ("b", None)):
        task_path = make_run(root / name, decoy_label=decoy)
        out[name] = (root / name, evaluate(load_task(task_path), root / name))
    return out


def test_report_keeps_the_contract_and_hand_computed_scores(runs):
    run, r = runs["a"]
    saved = json.loads((run / "report.json").read_text())
    assert CONTRACT <= set(saved) and TEACHER_KEYS <= set(saved["teacher"]) and STUDENT_KEYS <= set(saved["student"])
    t_acc, s_acc = expected_accuracy("blue")
    assert (r["teacher"]["score"], r["student"]["score"]) == pytest.approx((t_acc, s_acc))
    assert r["retained"] == pytest.approx(s_acc / t_acc)
    assert r["speedup"] == pytest.approx(r["teacher"]["ms_per_item"] / r["student"]["ms_per_item"])
    assert r["teacher"]["ms_per_item"] == pytest.approx(205.0)  # median of the measured single-item times
    lo, hi = r["student"]["score_ci"]
    assert lo <= s_acc <= hi and 0 < hi - lo < 0.6
    assert r["n_eval"] == 30 and r["metric"] == "accuracy" and r["kind"] == "classify"


def test_report_has_the_new_sections(runs):
    _, r = runs["a"]
    for key in ("metrics", "paired", "fidelity", "calibration", "cascade", "latency", "cost", "verdict", "confusion"):
        assert key in r, key
    assert {"accuracy", "macro_f1", "macro_f1_ci", "per_label"} <= set(r["metrics"]["student"])
    assert 0 <= r["paired"]["p_value"] <= 1 and r["paired"]["test"].startswith("McNemar")
    assert r["fidelity"]["kl_teacher_student"] > 0 and 0 < r["fidelity"]["jsd"] < 0.7
    cas = r["cascade"]
    assert cas["target"] == 0.99 and 0 <= cas["coverage"] <= 1 and cas["quality"] >= 0.99 * cas["teacher_quality"] - 1e-9
    assert cas["curve"][0]["coverage"] == 0.0 and cas["curve"][-1]["coverage"] == 1.0
    assert 0 <= r["calibration"]["student"]["ece"] <= 1
    s = r["latency"]["student"]
    assert s["p50_ms"] <= s["p95_ms"] and s["items_per_s_batched"] > 0
    c = r["cost"]
    assert c["teacher_usd_per_month"] == pytest.approx(c["teacher_usd_per_call"] * 100_000)
    assert c["break_even_months"] == pytest.approx(c["one_off_usd"] / (c["teacher_usd_per_month"] - c["student_usd_per_month"]))
    assert all(e["student"] != e["gold"] for e in r["examples"])
    conf = [e["student_confidence"] for e in r["examples"]]
    assert conf == sorted(conf, reverse=True)  # most confident errors first


def test_items_file_lines_up_with_gold(runs):
    run, r = runs["a"]
    items = [json.loads(x) for x in (run / "evaluate" / "items.jsonl").read_text().splitlines()]
    assert len(items) == r["n_eval"]
    assert sum(i["student_score"] for i in items) / len(items) == pytest.approx(r["student"]["score"])


def test_api_teacher_timing_and_cost_come_from_the_ledger(tmp_path):
    r = evaluate(load_task(make_run(tmp_path, api_teacher=True)), tmp_path)
    assert r["teacher"]["usd_per_1k"] == pytest.approx(2.0)  # $0.002 per labelling call; the $1 judge call is not one
    assert r["teacher"]["ms_per_item"] == pytest.approx(550.0)  # median of the gold-stage latencies, judge excluded
    assert r["teacher"]["ms_per_item_p95"] == pytest.approx(685.0)
    assert r["teacher"]["items_per_s_batched"] is None and r["latency"]["teacher"]["n"] == 4


def test_compare_two_runs(runs, tmp_path):
    (a, ra), (b, rb) = runs["a"], runs["b"]
    c = compare_runs([a, b], tmp_path / "cmp")
    assert [x["run"] for x in c["runs"]] == ["a", "b"]
    assert c["runs"][0]["vs_first"] is None
    vs = c["runs"][1]["vs_first"]
    assert vs["n"] == 30 and vs["diff"] == pytest.approx(rb["student"]["score"] - ra["student"]["score"])
    assert vs["diff"] == pytest.approx(4 / 30)  # B is right on the 4 decoy items A gets wrong
    assert vs["only_first_right"] == 4 and vs["only_second_right"] == 0
    assert vs["p_value"] == pytest.approx(2 / 2**4)  # exact McNemar: 2 · P(X ≤ 0), X ~ Bin(4, ½)
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert page.count("<tr>") == 3 and "data:image/png;base64," in page
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["baseline"] == "a"


def test_cli_compare_and_its_errors(runs, tmp_path):
    from protege.cli import app

    (a, _), (b, _) = runs["a"], runs["b"]
    res = CliRunner().invoke(app, ["evaluate", "--compare", str(a), str(b), "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "c" / "compare.html").is_file()
    res = CliRunner().invoke(app, ["evaluate", str(a), str(b)])
    assert res.exit_code == 2 and "--compare" in res.output
    res = CliRunner().invoke(app, ["evaluate", "--compare", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "report.json" in res.output

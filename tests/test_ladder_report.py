"""The student ladder in report.json / report.html: every rung scored on gold (reporting only), per-label
recall with flags, the learning curve and what more labels would buy — and none of it for a student that
the ladder did not choose. Built on the hand-made run of ``evalrun`` plus a fake train/stats.json in the
format the train side writes (issue 14)."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from evalrun import gold_rows, make_run, make_student, teacher_labels
from protege.reporting.model import Report
from protege.stages.evaluate import evaluate
from protege.stages.evaluate.ladder import (
    expected_agreement,
    labels_sentence,
    labels_to_buy,
    per_label_recall,
)
from protege.stats import mcnemar_p
from protege.task import load_task

FIT = {"form": "a - b * n**(-c)", "a": 0.95, "b": 2.0, "c": 0.5}
CURVE_N = [125, 250, 500, 1000]


def _curve() -> dict:
    ag = [expected_agreement(FIT, n) for n in CURVE_N]
    return {"rung": "static", "n": CURVE_N, "agreement": ag, "agreement_ci": [[a - 0.02, a + 0.02] for a in ag],
            "fit": FIT}


def _ladder_stats(n_train: int = 1000) -> dict:
    rung = {"params": {"C": 1.0}, "eligible": True, "size_bytes": 123_456, "train_s": 1.5, "ms_p50": 0.2}
    return {"n_train": n_train, "train_seconds": 2.0,
            "ladder": {"max_ms": 5.0, "folds": 5, "chosen": "static",
                       "why": "static agrees with the teacher most on held-out folds among rungs under 5 ms.",
                       "rungs": [{**rung, "name": "static", "cv_agreement": 0.91, "cv_ci": [0.89, 0.93],
                                  "folder": "ladder/static", "per_label_recall_cv": {"red": 0.9, "green": 0.8, "blue": 0.95}},
                                 {**rung, "name": "frozen-minilm", "cv_agreement": 0.88, "cv_ci": [0.86, 0.9],
                                  "folder": "ladder/frozen-minilm", "ms_p50": 3.0},
                                 {**rung, "name": "finetuned", "cv_agreement": 0.93, "cv_ci": [0.91, 0.95],
                                  "folder": "ladder/finetuned", "eligible": False, "ms_p50": 40.0}]},
            "learning_curve": _curve()}


def _add_ladder(root: Path) -> None:
    """Rung folders: 'static' is the chosen student (decoy → blue); 'frozen-minilm' ignores the decoy and is
    right on every gold item — better on gold, yet not chosen; 'finetuned' was too slow and has no folder."""
    make_student("blue").save_pretrained(root / "train" / "ladder" / "static")
    make_student(None).save_pretrained(root / "train" / "ladder" / "frozen-minilm")
    (root / "train" / "stats.json").write_text(json.dumps(_ladder_stats()))


@pytest.fixture(scope="module")
def ladder_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ladder")
    task_file = make_run(root)
    _add_ladder(root)
    return root, evaluate(load_task(task_file), root)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    return root, evaluate(load_task(make_run(root)), root)


# -- pure pieces -----------------------------------------------------------------------------------


def test_expected_agreement_is_the_power_law_and_refuses_bad_fits():
    assert expected_agreement(FIT, 400) == pytest.approx(0.95 - 2.0 / 20)
    assert expected_agreement({"a": 0.9}, 100) is None
    assert expected_agreement(FIT, 0) is None
    assert expected_agreement({**FIT, "a": float("nan")}, 100) is None
    assert expected_agreement({"a": 1.2, "b": 0.0, "c": 1.0}, 100) == 1.0  # agreement never above 1


def test_labels_to_buy_prices_and_gains():
    buy = labels_to_buy(_curve(), 1000, usd_per_label=0.002)
    assert [b["more"] for b in buy] == [500, 1000, 3000]
    now = expected_agreement(FIT, 1000)
    for b in buy:
        assert b["n_total"] == 1000 + b["more"]
        assert b["gain"] == pytest.approx(expected_agreement(FIT, b["n_total"]) - now)
        assert b["usd"] == pytest.approx(b["more"] * 0.002)
    gains = [b["gain"] for b in buy]
    assert gains == sorted(gains) and gains[0] > 0
    assert buy[-1]["extrapolation"] == pytest.approx(4.0)
    assert labels_to_buy(_curve(), 1000, None)[0]["usd"] is None
    assert labels_to_buy(None, 1000, 0.1) is None and labels_to_buy({"n": [1], "fit": None}, 1000, 0.1) is None
    s = labels_sentence(buy)
    assert s.startswith("Labelling 1,000 more inputs: +") and "$2.00" in s and "not gold accuracy" in s


def test_a_plateau_at_one_is_called_optimistic():
    from protege.stages.evaluate.ladder import fit_note, learning_curve_block

    assert fit_note(FIT) is None and "optimistic" in fit_note({**FIT, "a": 1.0})
    curve, buy = learning_curve_block({"learning_curve": {**_curve(), "fit": {**FIT, "a": 1.0}}}, 1000, 0.01, "x")
    assert curve["fit_note"] and "optimistic" in labels_sentence(buy, optimistic=True)
    assert "optimistic" not in labels_sentence(buy)
    assert learning_curve_block({"learning_curve": {}}, 1000, 0.01, "x") == (None, None)


def test_per_label_recall_flags_only_real_gaps():
    def prf(rec: dict, n: int = 20) -> dict:
        return {lab: {"precision": 1.0, "recall": r, "f1": 0.0, "support": n, "predicted": 5} for lab, r in rec.items()}

    m = {"teacher": {"per_label": prf({"a": 0.9, "b": 0.9, "c": 0.9})},
         "student": {"per_label": prf({"a": 0.88, "b": 0.5, "c": 0.85})}}
    out = per_label_recall(["a", "b", "c"], m)
    assert out["flagged"] == ["b"]
    assert out["labels"]["b"]["gap"] == pytest.approx(0.4)
    # a 1-of-2 miss is a 50-point gap but one item: not flagged
    small = {"teacher": {"per_label": prf({"a": 1.0}, n=2)}, "student": {"per_label": prf({"a": 0.5}, n=2)}}
    assert per_label_recall(["a"], small)["flagged"] == []
    assert per_label_recall(["a"], {"teacher": {}, "student": {}}) is None


# -- through evaluate ------------------------------------------------------------------------------


def test_every_rung_is_scored_on_gold_and_nothing_is_chosen_there(ladder_run):
    root, r = ladder_run
    lad = r["ladder"]
    assert lad["chosen"] == "static" and "held-out folds" in lad["why"]
    rows = {g["name"]: g for g in lad["rungs"]}
    assert list(rows) == ["static", "frozen-minilm", "finetuned"]
    chosen = rows["static"]
    assert chosen["chosen"] and chosen["score"] == pytest.approx(r["student"]["score"])
    assert chosen["p_vs_chosen"] == 1.0 and chosen["agreement"] == pytest.approx(r["student"]["agreement"])
    # the better-on-gold rung is reported as better, with a paired p against the chosen student, and stays unchosen
    frozen = rows["frozen-minilm"]
    assert frozen["score"] == 1.0 and not frozen["chosen"] and frozen["score"] > chosen["score"]
    gold = gold_rows(30)
    s_ok = np.array([not ("decoy" in g["text"] and g["label"] != "blue") for g in gold])
    assert frozen["p_vs_chosen"] == pytest.approx(mcnemar_p(np.ones(30, bool), s_ok)[0])
    t_lab = teacher_labels(gold)
    assert frozen["agreement"] == pytest.approx(np.mean([t == g["label"] for t, g in zip(t_lab, gold)]))
    assert frozen["cv_agreement"] == 0.88 and frozen["size_bytes"] == 123_456 and frozen["train_s"] == 1.5
    assert frozen["ms_p50"] > 0 and frozen["ms_p50_train"] == 3.0
    assert chosen["score_ci"][0] <= chosen["score"] <= chosen["score_ci"][1]
    missing = rows["finetuned"]
    assert missing["score"] is None and missing["eligible"] is False and "no saved model" in missing["note"]
    assert r["student"]["name"].endswith("(auto: static)")


def test_labels_to_buy_in_report_and_verdict(ladder_run):
    root, r = ladder_run
    buy = r["labels_to_buy"]
    usd_per_label = 0.05 / 3600 * 0.5  # evalrun's local teacher: 0.05 s batched per item at $0.50/hour
    assert [b["more"] for b in buy] == [500, 1000, 3000]
    for b in buy:
        assert b["usd"] == pytest.approx(b["more"] * usd_per_label)
    assert r["learning_curve"]["n_now"] == 1000 and r["learning_curve"]["usd_per_label"] == pytest.approx(usd_per_label)
    assert "agreement with the teacher" in r["learning_curve"]["measures"]
    assert "Labelling 1,000 more inputs" in r["verdict"]["text"] and "not gold accuracy" in r["verdict"]["text"]
    rep = Report.load(root)
    assert rep.ladder.chosen == "static" and rep.labels_to_buy[1].more == 1000
    assert json.loads((root / "report.json").read_text())["ladder"]["rungs"][0]["name"] == "static"


def test_per_label_recall_in_report(ladder_run):
    _, r = ladder_run
    rec = r["per_label_recall"]
    per = r["metrics"]["student"]["per_label"]
    assert set(rec["labels"]) == {"red", "green", "blue"}
    for lab, x in rec["labels"].items():
        assert x["student"] == per[lab]["recall"]
        assert x["teacher"] == r["metrics"]["teacher"]["per_label"][lab]["recall"]
    assert rec["labels"]["green"]["student_cv_vs_teacher"] == 0.8


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.stack, self.chosen_rows = {}, [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs[a.get("alt")] = a.get("src", "")
        if tag == "tr" and a.get("class") == "chosen":
            self.chosen_rows += 1
        if tag not in ("img", "br", "meta", "link"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def _page(path: Path) -> tuple[_Page, str]:
    text = path.read_text(encoding="utf-8")
    p = _Page()
    p.feed(text)
    p.close()
    return p, text


def test_report_html_shows_the_ladder_and_the_curve(ladder_run):
    root, _ = ladder_run
    page, text = _page(root / "report.html")
    assert "<h2>Student ladder</h2>" in text and "How many labels to buy" in text
    assert page.imgs["learning curve"].startswith("data:image/png;base64,")
    assert page.chosen_rows == 1
    assert "frozen-minilm" in text and "not eligible" in text and "never on gold" in text
    assert "not gold accuracy" in text or "not </b>" in text or "agreement with the teacher</b>" in text
    assert "student<br>predicted" in text and "CV vs teacher" in text


def test_no_ladder_means_no_ladder_keys_or_sections(plain_run):
    root, r = plain_run
    for key in ("ladder", "learning_curve", "labels_to_buy"):
        assert key not in r
    assert r["per_label_recall"]["labels"]  # per-label recall is there for every classify student
    assert "Labelling" not in r["verdict"]["text"]
    _, text = _page(root / "report.html")
    assert "Student ladder" not in text and "How many labels to buy" not in text
    d = Report.load(root).to_dict()
    assert "ladder" not in d and "labels_to_buy" not in d


def test_a_rung_that_cannot_load_is_noted_not_fatal(tmp_path):
    task_file = make_run(tmp_path)
    _add_ladder(tmp_path)
    cfg = tmp_path / "train" / "ladder" / "frozen-minilm" / "config.json"
    cfg.write_text(json.dumps({"protege_student": "no-such-student-kind"}))
    stats = _ladder_stats()
    del stats["learning_curve"]
    (tmp_path / "train" / "stats.json").write_text(json.dumps(stats))
    r = evaluate(load_task(task_file), tmp_path)
    row = next(g for g in r["ladder"]["rungs"] if g["name"] == "frozen-minilm")
    assert row["score"] is None and "could not be scored" in row["note"]
    assert "learning_curve" not in r and "labels_to_buy" not in r

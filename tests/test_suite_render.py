"""bench/suite/run.py's tables come from its JSON: merge of result files, the done-when verdict, the README block."""

from __future__ import annotations

import sys
from pathlib import Path

SUITE = Path(__file__).resolve().parents[1] / "bench" / "suite"
sys.path.insert(0, str(SUITE))

import run as suite_run  # noqa: E402


def _res(date: str, task: str, auto_acc: float, peer_acc: float, p: float, budget: int = 1000) -> dict:
    t_acc = 0.9
    rows = [{"task": task, "budget": budget, "model": "teacher (simulated)", "accuracy": t_acc, "ci": [0.88, 0.92],
             "kept": 1.0, "agreement": 1.0, "p_vs_ref": None, "ms_per_item": None, "train_s": None},
            {"task": task, "budget": budget, "model": suite_run.AUTO, "accuracy": auto_acc, "ci": [0.8, 0.9],
             "kept": auto_acc / t_acc, "agreement": 0.9, "p_vs_ref": None, "ms_per_item": 0.2, "train_s": 3.0,
             "auto_rung": "static", "auto_cv_agreement": 0.91, "auto_ms_ladder": 0.15},
            {"task": task, "budget": budget, "model": "TF-IDF + LR", "accuracy": peer_acc, "ci": [0.8, 0.9],
             "kept": peer_acc / t_acc, "agreement": 0.9, "p_vs_ref": p, "ms_per_item": 0.8, "train_s": 1.0}]
    info = {"task": task, "source": "pkg: file", "n_pool": 100, "n_gold": 50, "n_labels": 2, "median_len": 10,
            "len_unit": "words", "minority_share": 0.2, "minority_label": "b", "teacher_gold_accuracy": t_acc}
    return {"date": date, "machine": {"cpu": "cpu", "cores": 2, "torch_threads": 1, "load_avg_1m": 1.0},
            "settings": {"error_rate": 0.1, "reference": suite_run.AUTO, "maker_notes": {}}, "tasks": [info],
            "rows": rows, "wall_s": 10.0}


def test_merge_later_file_replaces_task_budget_rows():
    a = _res("d1", "x", 0.80, 0.85, 0.01)
    b = _res("d2", "y", 0.88, 0.86, 0.5)
    c = _res("d3", "x", 0.87, 0.85, 0.4)  # a re-run of task x
    m = suite_run.merge([a, b, c])
    assert [t["task"] for t in m["tasks"]] == ["x", "y"]
    auto_x = [r for r in m["rows"] if r["task"] == "x" and r["model"] == suite_run.AUTO]
    assert len(auto_x) == 1 and auto_x[0]["accuracy"] == 0.87
    assert m["wall_s"] == 30.0


def test_verdict_names_the_miss_and_its_size():
    v = {x["task"]: x for x in suite_run.verdicts(suite_run.merge([_res("d", "x", 0.80, 0.85, 0.01),
                                                                   _res("d", "y", 0.88, 0.90, 0.3)]))}
    assert not v["x"]["kept_ok"] and not v["x"]["peer_ok"]
    assert abs(v["x"]["kept_short"] - (0.95 - 0.80 / 0.9)) < 1e-9
    assert v["y"]["kept_ok"] and v["y"]["peer_ok"]  # 0.978 kept; 2 points behind the peer but p = 0.3
    md = suite_run.markdown(suite_run.merge([_res("d", "x", 0.80, 0.85, 0.01)]))
    assert "misses: kept 0.889 < 0.95" in md and "5.0 points behind TF-IDF + LR, p = 0.01" in md


def test_readme_block_is_replaced_between_markers(tmp_path):
    p = tmp_path / "README.md"
    p.write_text(f"head\n{suite_run.README_START}\nold table\n{suite_run.README_END}\ntail\n")
    suite_run.write_readme(_res("d", "x", 0.86, 0.85, 0.6), p)
    text = p.read_text()
    assert "old table" not in text and text.startswith("head\n") and text.endswith(f"{suite_run.README_END}\ntail\n")
    assert "| x | 1000 | **protege auto (ladder)** | 0.860" in text


def test_embedding_cache_is_shared_across_unit_processes_through_disk(tmp_path, monkeypatch):
    """A unit (one process) writes its new embeddings as a shard; another unit's cache reads them; texts not
    encoded by anyone stay missing, so they are encoded, not taken from a neighbour."""
    import numpy as np

    monkeypatch.setitem(suite_run.EMBED_CACHE, "dir", tmp_path / "emb")
    keys = [suite_run._text_key(t) for t in ("a", "b")]
    suite_run._disk_cache_save(keys, np.array([[1.0, 0.0], [0.0, 1.0]]))
    suite_run._disk_cache_save([suite_run._text_key("c")], np.array([[0.5, 0.5]]))
    other: dict = {}
    seen: set = set()
    suite_run._disk_cache_load(other, seen)
    assert np.allclose(other[keys[1]], [0.0, 1.0]) and np.allclose(other[suite_run._text_key("c")], [0.5, 0.5])
    assert suite_run._text_key("d") not in other
    assert not list((tmp_path / "emb").glob("*.tmp*"))  # shards are written whole, then renamed
    suite_run._disk_cache_load(other, seen)  # shards already read are not read again
    assert len(seen) == 2


def test_suite_ladders_and_e2e_row_share_the_student_settings(monkeypatch):
    monkeypatch.setitem(suite_run.LADDER_BUDGET_S, "s", 300.0)
    monkeypatch.setitem(suite_run.LADDER_RUNGS, "r", ["static", "frozen"])
    assert suite_run.ladder_student_settings() == {"time_budget_s": 300.0, "rungs": ["static", "frozen"]}
    monkeypatch.setitem(suite_run.LADDER_BUDGET_S, "s", None)
    monkeypatch.setitem(suite_run.LADDER_RUNGS, "r", None)
    assert suite_run.ladder_student_settings() == {}


def test_ladder_table_shows_every_rung_or_why_not():
    rows = [{"task": "x", "budget": 100, "model": suite_run.AUTO, "auto_rung": "frozen",
             "ladder": [{"name": "static", "cv_agreement": 0.81, "ms_p50": 0.2, "train_s": 3.0},
                        {"name": "frozen", "cv_agreement": 0.85, "ms_p50": 2.0, "train_s": 5.0},
                        {"name": "encoder", "cv_agreement": None, "train_s": 0.0}]},
            {"task": "x", "budget": 200, "model": suite_run.AUTO, "auto_rung": "static",
             "ladder": [{"name": "static", "cv_agreement": 0.9, "ms_p50": 0.2, "train_s": 4.0},
                        {"name": "frozen", "cv_agreement": None, "error": "ImportError: onnxruntime"}]}]
    lines = suite_run.ladder_table(rows)
    assert lines[3] == "| task | labels bought | static | frozen | encoder |"
    assert lines[5] == "| x | 100 | 0.810, 0.20 ms, 3 s | **0.850, 2.00 ms, 5 s** | skipped |"
    assert lines[6] == ("| x | 200 | **0.900, 0.20 ms, 4 s** | failed: ImportError: onnxruntime | "
                        "not in the ladder |")
    assert suite_run.ladder_table([{"task": "x", "budget": 1, "model": "TF-IDF + LR"}]) == []

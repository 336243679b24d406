"""``protege evaluate --compare RUN...``: several runs (students, settings, teachers) side by side.

Reads each run's ``report.json`` — nothing is re-scored, so the table shows exactly what each run
reported — and, where two runs scored the same gold items (``evaluate/items.jsonl``), a paired test
of each run's student against the first run's. Two CIs that overlap do not mean "no difference"; a
paired test on the same items is the fair comparison between students.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from protege import metrics as M
from protege.data import read_jsonl, write_json, write_text


def load_run(path: Path) -> tuple[dict, list[dict] | None, Path]:
    """(report, per-item rows or None, run folder) from a run folder or a report.json path."""
    p = Path(path)
    run = p.parent if p.name == "report.json" else p
    rp = run / "report.json"
    if not rp.is_file():
        raise FileNotFoundError(f"{run} has no report.json; run `protege evaluate` (or `protege run`) there first")
    report = json.loads(rp.read_text(encoding="utf-8"))
    items_path = run / "evaluate" / "items.jsonl"
    return report, (read_jsonl(items_path) if items_path.is_file() else None), run


def paired_vs(base: list[dict] | None, other: list[dict] | None, binary: bool) -> dict | None:
    """Paired test of ``other``'s student against ``base``'s on the gold items both scored identically."""
    if not base or not other:
        return None
    b = {r["id"]: r for r in base}
    common = [(b[r["id"]], r) for r in other if r["id"] in b and b[r["id"]]["gold"] == r["gold"]]
    if not common:
        return None
    x = np.array([o["student_score"] for _, o in common], dtype=float)
    y = np.array([s["student_score"] for s, _ in common], dtype=float)
    return {**M.paired_test(x, y, binary), "n": len(common)}


def _labels(runs: list[Path]) -> list[str]:
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return names
    return [str(r) for r in runs]


def compare_runs(paths: list[Path], out: Path | None = None) -> dict:
    """Build the comparison; with ``out``, write ``compare.json`` and ``compare.html`` there."""
    if len(paths) < 1:
        raise ValueError("--compare needs at least one run folder (two or more to compare)")
    loaded = [load_run(p) for p in paths]
    names = _labels([run for _, _, run in loaded])
    base_items = loaded[0][1]
    rows = []
    for name, (r, items, run) in zip(names, loaded):
        binary = r.get("metric") == "accuracy"
        cas, cal = r.get("cascade") or {}, (r.get("calibration") or {}).get("student") or {}
        rows.append({
            "run": name, "path": str(run), "task": r["task"], "kind": r.get("kind"), "metric": r["metric"],
            "n_eval": r["n_eval"], "student": r["student"]["name"], "teacher": r["teacher"]["name"],
            "score": r["student"]["score"], "score_ci": r["student"]["score_ci"], "teacher_score": r["teacher"]["score"],
            "teacher_score_ci": r["teacher"]["score_ci"], "retained": r["retained"], "retained_ci": r.get("retained_ci"),
            "agreement": r["student"].get("agreement"), "ece": cal.get("ece"), "cascade_threshold": cas.get("threshold"),
            "cascade_coverage": cas.get("coverage"), "ms_per_item": r["student"]["ms_per_item"],
            "items_per_s_batched": r["student"].get("items_per_s_batched"), "usd_per_1k": r["student"]["usd_per_1k"],
            "break_even_months": (r.get("cost") or {}).get("break_even_months"), "params": r["student"].get("params"),
            "speedup": r.get("speedup"), "verdict": (r.get("verdict") or {}).get("decision"),
            "vs_first": None if run is loaded[0][2] else paired_vs(base_items, items, binary),
        })
    result = {"runs": rows, "date": time.strftime("%Y-%m-%d %H:%M"), "baseline": names[0]}
    if out is not None:
        from protege.reporting.html import render_compare_html

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "compare.json", result)
        write_text(out / "compare.html", render_compare_html(result))
    return result

"""What every evaluation shares, whatever the task kind: the inputs it reads, the teacher's timing and price,
the cost block (break-even), the report's null notes, and writing report.json + report.html as one unit."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from protege import metrics as M
from protege.artifacts import require, stage_writer
from protege.costs import (
    break_even_months,
    chart_months,
    compute_usd_per_call,
    cumulative_costs,
)
from protege.data import load_gold, read_jsonl, write_json, write_jsonl, write_text
from protege.registry import capabilities
from protege.students import load_student
from protege.task import TaskSpec
from protege.teachers.ledger import Ledger


def student_name(student, task: TaskSpec) -> str:
    """Short name for tables: what the student is, not where it was saved."""
    kind = task.student.kind
    if kind == "auto":  # the ladder chose: name what was chosen, by the class that was loaded
        if isinstance(getattr(student, "base", None), np.ndarray):
            kind = "static"
        else:
            return f"auto:{type(student).__name__}"
    if kind == "static":
        ngrams = getattr(student, "ngrams", None)
        return f"static-{int(student.base.shape[1])}d" + (f"+{ngrams.n}gram" if ngrams is not None else "") + "+linear"
    ref = getattr(task.student, "model", None) or (task.student.embedder if kind == "encoder" else task.teacher.model)
    return f"{kind}:{str(ref).rstrip('/').rsplit('/', 1)[-1].removeprefix('pkg:')}"


def teacher_timing(task: TaskSpec, out: Path, gen_stats: dict) -> dict:
    """Teacher latency from the generate stage: measured locally, or per-call wall time from the ledger."""
    tt = gen_stats.get("timing") or {}
    if tt.get("single_s"):
        lat = M.latency_summary(tt["single_s"])
    else:
        lat = {"p50_ms": None, "p95_ms": None, "mean_ms": None, "n": 0}
        if (out / "ledger.sqlite").is_file():
            with Ledger(out / "ledger.sqlite") as led:
                tid = gen_stats.get("teacher_id", "")  # this run's labelling calls only, not judge / baseline
                lat = M.latency_summary(led.latencies(tid, "generate") + led.latencies(tid, "gold"))
        if lat["p50_ms"] is None and tt.get("single_s_p50"):
            lat.update(p50_ms=tt["single_s_p50"] * 1000, n=1)
    b = tt.get("batched_s_per_item")
    local = capabilities(task.teacher.backend).local
    return {**lat, "batched_ms_per_item": b * 1000 if (b and local) else None,
            "items_per_s_batched": 1.0 / b if (b and local) else None,
            "source": tt.get("source") or ("measured" if local else "ledger")}


def teacher_usd_per_call(task: TaskSpec, out: Path, seconds: float) -> float:
    if capabilities(task.teacher.backend).local:
        return compute_usd_per_call(seconds, task.teacher.usd_per_hour)
    with Ledger(out / "ledger.sqlite") as led:
        row = led.db.execute("SELECT avg(cost_usd) FROM calls WHERE status='ok' AND stage IN ('generate','gold')").fetchone()
    return float(row[0] or 0.0)


def cost_block(task: TaskSpec, gen_stats: dict, train_stats: dict, t_usd_call: float, s_ms: float,
               timed: str) -> dict:
    """report.json's ``cost``: per call, per 1k, per month at the task's volume, one-off spend (labelling +
    training), break-even and the cumulative-cost curves. The student is priced by its p50 ``s_ms``."""
    vol = task.volume_per_month
    s_usd_call = compute_usd_per_call(s_ms / 1000, task.student.usd_per_hour)
    labelling_usd = float(gen_stats["inputs"]["usd"])
    training_usd = compute_usd_per_call(train_stats["train_seconds"], task.student.usd_per_hour)
    one_off = labelling_usd + training_usd
    be = break_even_months(t_usd_call, s_usd_call, vol, one_off)
    return {"volume_per_month": vol, "one_off_usd": one_off, "labelling_usd": labelling_usd,
            "training_usd": training_usd, "teacher_usd_per_call": t_usd_call, "student_usd_per_call": s_usd_call,
            "teacher_usd_per_1k": t_usd_call * 1000, "student_usd_per_1k": s_usd_call * 1000,
            "teacher_usd_per_month": t_usd_call * vol, "student_usd_per_month": s_usd_call * vol,
            "break_even_months": be,
            "basis": f"local models: single-item p50 {timed} × usd_per_hour; API teacher: mean ledger $ per call",
            "cumulative": cumulative_costs(chart_months(be), t_usd_call, s_usd_call, vol, one_off)}


def null_notes(report: dict) -> dict:
    """Why a headline figure is null (an undefined ratio is reported as null, never NaN)."""
    notes = {}
    if report["retained"] is None:
        notes["retained"] = (f"the teacher scored 0 {report['metric']} on the gold items: student / teacher is "
                             f"undefined, so retained is null")
    if report["speedup"] is None:
        notes["speedup"] = "no teacher latency was measured (no local timing, no ledger latencies): speedup is null"
    return notes


def eval_inputs(task: TaskSpec, out: Path) -> tuple:
    """What every evaluation reads: (train config, generate config, gold rows, the teacher's answer row for
    each gold row in order, generate stats, train stats, the loaded student)."""
    train_cfg = require(out / "train", "train")
    gen = require(out / "generate", "generate")
    gold_rows = load_gold(task)
    teacher_rows = {r["id"]: r for r in read_jsonl(out / "generate" / "gold.jsonl")}
    missing = [g["id"] for g in gold_rows if g["id"] not in teacher_rows]
    if missing:
        raise ValueError(f"the generate artifact has no teacher answer for {len(missing)} gold items "
                         f"(gold file changed?); re-run `protege generate`")
    trows = [teacher_rows[g["id"]] for g in gold_rows]
    return (train_cfg, gen, gold_rows, trows, read_json(out / "generate" / "stats.json"),
            read_json(out / "train" / "stats.json"), load_student(out / "train" / "student"))


def finite(x):
    """``x`` with every NaN / ±Infinity float replaced by None (numpy scalars made plain): JSON has no NaN,
    and a report that says NaN is one a strict parser rejects."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_outputs(out: Path, report: dict, items: list[dict], config: dict) -> dict:
    """report.json (no NaN: undefined figures are null), report.html, and evaluate/items.jsonl for --compare,
    written as one unit. Returns the report as written.

    The pair lives in ``evaluate/`` (swapped in by one folder rename with the stage's config.json); the run
    root's ``report.json`` / ``report.html`` are relative symlinks into it, so a reader never sees a new
    report.json beside an old report.html, whenever the writer is killed. Where symlinks are not possible the
    root gets copies, html first and json last.
    """
    from protege.reporting.html import render_html

    report = finite(report)
    with stage_writer(out / "evaluate", config) as tmp:
        write_jsonl(tmp / "items.jsonl", finite(items))
        write_text(tmp / "report.html", render_html(report))
        write_json(tmp / "report.json", report, allow_nan=False)
    for name in ("report.html", "report.json"):  # html first: a reader that finds report.json finds its html
        _link_or_copy(out / name, Path("evaluate") / name)
    return report


def _link_or_copy(path: Path, target: Path) -> None:
    """Point ``path`` at ``target`` (relative to its folder) with an atomic replace; a copy where links fail."""
    import os

    if path.is_symlink() and Path(os.readlink(path)) == target:
        return
    tmp = path.with_name(f".{path.name}.link-{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, path)
    except OSError:  # no symlinks here (some Windows setups, some network shares)
        tmp.unlink(missing_ok=True)
        write_text(path, (path.parent / target).read_text(encoding="utf-8"))


def read_json(p: Path) -> dict:
    import json

    return json.loads(Path(p).read_text(encoding="utf-8"))


def machine_info() -> dict:
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}

"""Stage 5: teacher and student on the same held-out gold items — numbers an ML engineer would sign.

What is measured, and why this way:

- **Quality by task kind** (:mod:`protege.metrics`): a per-item primary score with a bootstrap CI,
  plus corpus figures (macro-F1, per-label P/R, confusion). Teacher and student are scored on the
  same gold items with the same resamples, so ``retained`` has a paired CI.
- **Paired test**: McNemar on right/wrong items (paired bootstrap for real-valued scores). Two CIs
  that overlap say little; the paired test asks whether the student is worse on *these* items.
- **Fidelity**: agreement with the teacher and KL / JSD to its label distributions where it gave
  them — what distillation optimises, separate from what gold rewards.
- **Calibration and the cascade**: ECE with reliability bins, and the coverage-vs-quality curve of
  "answer with the student when its confidence ≥ t, else ask the teacher". The chosen threshold is
  written to ``report["cascade"]`` for ``protege serve``. It is picked on the gold set, so it is
  optimistic by the noise of that pick: the curve is there to show how flat it is around ``t``.
- **Speed and cost on this machine, in this run**: student latency one item at a time (p50/p95) and
  batched throughput; the teacher's from the generate stage (a local model timed there, an API
  teacher's per-call wall time from the ledger); $ per 1k calls, per month, months to break even.

Artifacts: ``report.json`` + ``report.html`` at the run root (the DESIGN.md contract), and
``evaluate/items.jsonl`` — one row per gold item — which ``protege evaluate --compare`` pairs across runs.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from . import metrics as M
from .artifacts import fingerprint, require, stage_writer
from .costs import break_even_months, chart_months, compute_usd_per_call, cumulative_costs
from .data import load_gold, read_jsonl, write_json, write_jsonl, write_text
from .ledger import Ledger
from .students import load_student
from .task import TaskSpec
from .timing import measure

CASCADE_TARGET = 0.99  # share of the teacher's quality the cascade must keep


def student_name(student, task: TaskSpec) -> str:
    """Short name for tables: what the student is, not where it was saved."""
    kind = task.student.kind
    if kind == "static":
        ngrams = getattr(student, "ngrams", None)
        return f"static-{int(student.base.shape[1])}d" + (f"+{ngrams.n}gram" if ngrams is not None else "") + "+linear"
    ref = getattr(task.student, "model", None) or (task.student.embedder if kind == "encoder" else task.teacher.model)
    return f"{kind}:{str(ref).rstrip('/').rsplit('/', 1)[-1].removeprefix('pkg:')}"


def student_outputs(student, texts: list[str], labels: list[str]) -> tuple[list, np.ndarray | None]:
    """(predicted labels, probabilities or None): students without ``predict_proba`` (a causal LM
    answering in words) get no calibration or cascade section, since they have no confidence."""
    if hasattr(student, "predict_proba"):
        proba = np.asarray(student.predict_proba(texts))
        return [labels[i] for i in proba.argmax(1)], proba
    return list(student.predict(texts)), None


def time_student(student, texts: list[str], n_single: int = 200, repeats: int = 3) -> dict:
    """Single-item latencies (one call per item, as a server sees them) and batched throughput."""
    fn = student.predict_proba if hasattr(student, "predict_proba") else student.predict
    single, batched = measure(fn, texts, n_single=n_single, repeats=repeats, warmup=4)
    return {**M.latency_summary(single), "batched_ms_per_item": batched * 1000,
            "items_per_s_batched": 1.0 / batched if batched else None, "batch_size": len(texts)}


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
    local = task.teacher.backend == "hf"
    return {**lat, "batched_ms_per_item": b * 1000 if (b and local) else None,
            "items_per_s_batched": 1.0 / b if (b and local) else None,
            "source": tt.get("source") or ("measured" if local else "ledger")}


def _teacher_usd_per_call(task: TaskSpec, out: Path, seconds: float) -> float:
    if task.teacher.backend == "hf":
        return compute_usd_per_call(seconds, task.teacher.usd_per_hour)
    with Ledger(out / "ledger.sqlite") as led:
        row = led.db.execute("SELECT avg(cost_usd) FROM calls WHERE status='ok' AND stage IN ('generate','gold')").fetchone()
    return float(row[0] or 0.0)


def quality(task: TaskSpec, gold: list[str], t_pred: list, s_pred: list, s_proba: np.ndarray | None,
            t_probs: list | None) -> dict:
    """Everything about quality: metrics by kind, paired test, fidelity, calibration, cascade."""
    kind, labels = task.kind, task.labels
    schema = getattr(task, "schema_", None) or getattr(task, "json_schema", None)
    t_items, t_m = M.score_items(kind, gold, t_pred, labels=labels, schema=schema)
    s_items, s_m = M.score_items(kind, gold, s_pred, labels=labels, schema=schema)
    binary = kind == "classify"
    agree = np.array([a == b for a, b in zip(s_pred, t_pred)], dtype=float)
    fidelity: dict = {"agreement": float(agree.mean()), "agreement_ci": list(M.bootstrap_ci(agree))}
    if kind == "classify" and s_proba is not None and t_probs is not None:
        have = [i for i, p in enumerate(t_probs) if p is not None]
        if have:
            fidelity.update(M.divergences(np.array([t_probs[i] for i in have]), s_proba[have]))
            fidelity["teacher_soft_labels"] = True
    q = {"metrics": {"teacher": t_m, "student": s_m},
         "paired": {**M.paired_test(s_items, t_items, binary), "a": "student", "b": "teacher"},
         "fidelity": fidelity, "t_items": t_items, "s_items": s_items, "agree": agree}
    if s_proba is not None:
        conf = s_proba.max(1)
        q["calibration"] = {"student": M.calibration(conf, s_items)}
        if t_probs is not None and all(p is not None for p in t_probs):
            q["calibration"]["teacher"] = M.calibration(np.array(t_probs).max(1), t_items)
        curve = M.coverage_curve(conf, s_items, t_items)
        pick = M.choose_threshold(curve, float(t_items.mean()), CASCADE_TARGET)
        covered = conf >= pick["threshold"]
        system = np.where(covered, s_items, t_items)
        q["cascade"] = {"threshold": pick["threshold"], "target": CASCADE_TARGET, "coverage": pick["coverage"],
                        "quality": pick["cascade"], "quality_ci": list(M.bootstrap_ci(system)),
                        "student_quality_on_covered": pick["selective"], "teacher_quality": pick["teacher_quality"],
                        "needed": pick["needed"], "metric": M.PRIMARY[kind], "confidence": "student max probability",
                        "selected_on": f"{len(gold)} gold items (re-check on shadow traffic)",
                        "curve": M.thin_curve(curve)}
    return q


def worst_errors(texts, gold, t_pred, s_pred, s_items, s_conf, t_conf, k: int = 20) -> list[dict]:
    """The student's errors, most confident first: those are the ones a cascade would not catch."""
    wrong = [i for i in range(len(gold)) if s_items[i] < 1.0]
    wrong.sort(key=lambda i: (s_items[i], -(s_conf[i] if s_conf is not None else 0.0)))
    return [{"text": texts[i][:300], "gold": gold[i], "teacher": t_pred[i], "student": s_pred[i],
             "student_confidence": float(s_conf[i]) if s_conf is not None else None,
             "teacher_confidence": None if t_conf is None or t_conf[i] is None else float(t_conf[i]),
             "copied_teacher": s_pred[i] == t_pred[i]} for i in wrong[:k]]


def verdict(r: dict) -> dict:
    """A one-line decision with the numbers that justify it (the report's headline)."""
    t, s, p, cas = r["teacher"], r["student"], r["paired"], r.get("cascade") or {}
    ret, sig = r["retained"], p["p_value"] < 0.05
    if ret is None:
        return {"decision": "not yet", "text": f"Not yet: the teacher scores {t['score']:.3f} {r['metric']} on the gold "
                f"items, so there is nothing to retain — fix the teacher's prompt (or the gold labels) first."}
    lo = (r.get("retained_ci") or [ret])[0]
    if s["score"] >= t["score"] or (not sig and lo >= 0.95):
        how = "significantly better than" if (sig and s["score"] > t["score"]) else "on par with"
        fast = f" and {r['speedup']:,.0f}x faster" if r.get("speedup") else ""
        return {"decision": "ship", "text": f"Ship the student: it is {how} the teacher "
                f"({ret:.1%} of its {r['metric']}, {p['test']} p = {p['p_value']:.2g}){fast}."}
    if cas.get("coverage", 0) >= 0.5:
        return {"decision": "cascade", "text": f"Ship behind a cascade: answering only when confidence ≥ "
                f"{cas['threshold']:.2f} covers {cas['coverage']:.0%} of traffic and keeps {CASCADE_TARGET:.0%} of the "
                f"teacher's {r['metric']}; alone the student keeps {ret:.1%} (p = {p['p_value']:.2g})."}
    return {"decision": "not yet", "text": f"Not yet: the student keeps {ret:.1%} of the teacher's {r['metric']} "
            f"(p = {p['p_value']:.2g}) and a cascade at {CASCADE_TARGET:.0%} would cover only "
            f"{cas.get('coverage', 0):.0%} of traffic. More or better-curated teacher labels first."}


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
    return (train_cfg, gen, gold_rows, trows, _read(out / "generate" / "stats.json"),
            _read(out / "train" / "stats.json"), load_student(out / "train" / "student"))


def evaluate(task: TaskSpec, out: Path) -> dict:
    out = Path(out)
    if task.kind != "classify":
        from .evaluate_text import evaluate_text

        return evaluate_text(task, out)
    train_cfg, gen, gold_rows, trows, gen_stats, train_stats, student = eval_inputs(task, out)
    texts, gold = [g["text"] for g in gold_rows], [g["label"] for g in gold_rows]
    t_pred = [r.get("label") for r in trows]
    t_probs = [r.get("probs") for r in trows]
    t_conf = [r.get("confidence") if r.get("status") == "ok" else None for r in trows]
    s_pred, s_proba = student_outputs(student, texts, task.labels)
    s_conf = None if s_proba is None else s_proba.max(1)
    q = quality(task, gold, t_pred, s_pred, s_proba, t_probs)
    t_items, s_items = q.pop("t_items"), q.pop("s_items")
    q.pop("agree")
    primary = M.PRIMARY[task.kind]
    t_score, s_score = float(t_items.mean()), float(s_items.mean())

    st = time_student(student, texts)
    tt = teacher_timing(task, out, gen_stats)
    t_ms, s_ms = tt["p50_ms"] or float("nan"), st["p50_ms"]
    cost = cost_block(task, gen_stats, train_stats, _teacher_usd_per_call(task, out, t_ms / 1000), s_ms, "wall time")
    report = {
        "task": task.name, "kind": task.kind, "metric": primary, "n_eval": len(gold),
        "teacher": {"name": gen_stats["teacher"], "score": t_score, "score_ci": q["metrics"]["teacher"][f"{primary}_ci"],
                    "ms_per_item": t_ms, "ms_per_item_p95": tt["p95_ms"], "ms_per_item_batched": tt["batched_ms_per_item"],
                    "items_per_s_batched": tt["items_per_s_batched"], "usd_per_1k": cost["teacher_usd_per_1k"],
                    "usd_per_month": cost["teacher_usd_per_month"], "timing_source": tt["source"],
                    "invalid_answers": int(sum(p is None for p in t_pred))},
        "student": {"name": student_name(student, task),
                    "score": s_score, "score_ci": q["metrics"]["student"][f"{primary}_ci"],
                    "agreement": q["fidelity"]["agreement"], "agreement_ci": q["fidelity"]["agreement_ci"],
                    "ms_per_item": s_ms, "ms_per_item_p95": st["p95_ms"], "ms_per_item_batched": st["batched_ms_per_item"],
                    "items_per_s_batched": st["items_per_s_batched"], "usd_per_1k": cost["student_usd_per_1k"],
                    "usd_per_month": cost["student_usd_per_month"], "params": student.n_params,
                    "n_train": train_stats["n_train"]},
        "retained": s_score / t_score if t_score else None,
        "retained_ci": list(M.paired_ratio_ci(s_items, t_items)) if t_score else None,
        "speedup": t_ms / s_ms if (s_ms and math.isfinite(t_ms)) else None,
        "speedup_batched": (tt["batched_ms_per_item"] / st["batched_ms_per_item"]
                            if (tt["batched_ms_per_item"] and st["batched_ms_per_item"]) else None),
        "labels": task.labels,
        **q,
        "confusion": {"teacher": M.confusion(gold, t_pred, task.labels), "student": M.confusion(gold, s_pred, task.labels)},
        "latency": {"student": st, "teacher": tt},
        "cost": cost,
        "data": {"teacher_labelled": gen_stats["n_inputs"], "curated": _read(out / "curate" / "stats.json"),
                 "train": train_stats},
        "machine": _machine(), "generate_fingerprint": gen["fingerprint"],
        "examples": worst_errors(texts, gold, t_pred, s_pred, s_items, s_conf, t_conf),
        "errors": {"student": int((s_items < 1).sum()),
                   "copied_from_teacher": int(sum(s_items[i] < 1 and s_pred[i] == t_pred[i] for i in range(len(gold))))},
    }
    notes = null_notes(report)
    if notes:
        report["notes"] = notes
    report["verdict"] = verdict(report)
    items = [{"id": g["id"], "gold": y, "teacher": tp, "student": sp, "teacher_score": float(ts),
              "student_score": float(ss), "student_confidence": None if s_conf is None else float(s_conf[i])}
             for i, (g, y, tp, sp, ts, ss) in enumerate(zip(gold_rows, gold, t_pred, s_pred, t_items, s_items))]
    return write_outputs(out, report, items, {"stage": "evaluate", "task": task.name, "fingerprint": fingerprint(
        {"generate": gen["fingerprint"], "train": train_cfg.get("fingerprint")})})


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
    from .report import render_html

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


def _read(p: Path) -> dict:
    import json

    return json.loads(Path(p).read_text(encoding="utf-8"))


def _machine() -> dict:
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

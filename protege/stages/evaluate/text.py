"""Stage 5 for extract / generate tasks: teacher and student answer the same held-out gold inputs.

The teacher's answers were produced in the generate stage through the ledger (stage ``gold``); the
student answers here. Both are scored against gold by :meth:`protege.kinds.Kind.score` — extract:
per-item field F1 (primary), JSON validity, exact match; generate: per-item ROUGE-L (primary) and chrF —
with bootstrap CIs on the same resamples and a paired bootstrap test. Latency is single-item greedy
generation for both (the teacher's timed in the generate stage for a local model, or per-call wall time
from the ledger for an API). With ``evaluate.judge`` (generate tasks), the teacher also judges student vs
teacher answers pairwise in both orders (:mod:`protege.stages.evaluate.judge`), through the ledger.

There is no calibration or cascade section: a generated answer has no single confidence to threshold.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from protege import metrics as M
from protege.stages.evaluate.economics import explicit_max_ms, gate, speed_phrase
from protege.artifacts import fingerprint
from protege.stages.evaluate.common import (
    cost_block,
    eval_inputs,
    machine_info,
    null_notes,
    read_json,
    student_name,
    teacher_timing,
    teacher_usd_per_call,
    write_outputs,
)
from protege.stages.keys import EVALUATE
from protege.task import TaskSpec
from protege.teachers.ledger import Ledger
from protege.kinds import Kind, kind_of


def time_text_student(student, texts: list[str], n_single: int) -> dict:
    """Single-item greedy generation times (warm-up first) — what a server answering one request sees."""
    from protege.timing import time_each

    texts = texts[: max(1, n_single)]
    student.generate(texts[:1], batch_size=1)
    return M.latency_summary(time_each(texts, lambda t: student.generate([t], batch_size=1)))


def _fidelity(kind: Kind, t_out: list, s_out: list) -> dict:
    agree = np.array([kind.same_answer(s, t) for s, t in zip(s_out, t_out)], dtype=float)
    f = {"agreement": float(agree.mean()), "agreement_ci": list(M.bootstrap_ci(agree)),
         "agreement_rule": "same fields and values" if kind.json else "same text (whitespace aside)"}
    # how close the student is to its teacher, scored like gold (teacher answer as the reference)
    items, _ = kind.score([t or "" for t in t_out], s_out)
    f[f"{kind.metric}_vs_teacher"] = float(items.mean())
    f[f"{kind.metric}_vs_teacher_ci"] = list(M.bootstrap_ci(items))
    return f


def worst_text_errors(texts, gold, t_out, s_out, t_items, s_items, k: int = 15) -> list[dict]:
    """The student's lowest-scoring gold items (ties: where the teacher did best first)."""
    idx = [i for i in range(len(gold)) if s_items[i] < 1.0]
    idx.sort(key=lambda i: (s_items[i], -t_items[i]))
    return [{"text": texts[i][:400], "gold": gold[i], "teacher": t_out[i], "student": s_out[i],
             "teacher_score": float(t_items[i]), "student_score": float(s_items[i]),
             "copied_teacher": s_out[i] is not None and s_out[i] == t_out[i]} for i in idx[:k]]


def text_verdict(r: dict) -> dict:
    t, s, p = r["teacher"], r["student"], r["paired"]
    ret, metric = r.get("retained"), r["metric"]
    if ret is None:
        return {"decision": "not yet", "text": f"Not yet: the teacher scores {t['score']:.3f} {metric} on the gold "
                f"items, so there is nothing to retain — fix the teacher's prompt (or the gold answers) first."}
    sig = p["p_value"] < 0.05
    lo = (r.get("retained_ci") or [ret])[0]
    speed = speed_phrase(r.get("speedup"))
    if s["score"] >= t["score"] or (not sig and lo >= 0.95):
        return {"decision": "ship", "text": f"Ship the student: it keeps {ret:.1%} of the teacher's {metric} "
                f"({p['test']} p = {p['p_value']:.2g}){speed}."}
    return {"decision": "not yet", "text": f"Not yet: the student keeps {ret:.1%} of the teacher's {metric} "
            f"(p = {p['p_value']:.2g}). More or better-curated teacher answers, more epochs, or a larger student first."}


def run_judge(task: TaskSpec, out: Path, texts, t_out, s_out, gold) -> dict:
    """Pairwise LLM-as-judge (teacher backend as judge), both orders, through the run's ledger."""
    from protege.registry import make_teacher
    from protege.stages.evaluate.judge import judge_task, pairwise_judge

    n = len(texts) if task.evaluate.judge_max_items is None else min(len(texts), task.evaluate.judge_max_items)
    judge = make_teacher(judge_task(task))
    try:
        with Ledger(out / "ledger.sqlite") as led:
            res = pairwise_judge(judge, led, task.instruction, texts[:n], [t or "" for t in t_out[:n]],
                                 [s or "" for s in s_out[:n]], gold[:n] if task.evaluate.judge_reference else None,
                                 budget_usd=task.teacher.budget_usd)
    finally:
        judge.close()
    res["items"] = res["items"][:50]
    return res


def evaluate_text(task: TaskSpec, out: Path) -> dict:

    out = Path(out)
    train_cfg, gen, gold_rows, trows, gen_stats, train_stats, student = eval_inputs(task, out)
    kind, schema = kind_of(task), task.schema_
    texts, gold = [g["text"] for g in gold_rows], [g["label"] for g in gold_rows]
    t_out = [r.get("output") if r.get("status") == "ok" else None for r in trows]

    t0 = time.perf_counter()
    s_gen = student.generate(texts, batch_size=max(1, task.student.batch_size), description="student: gold inputs")
    batched_s = (time.perf_counter() - t0) / max(1, len(texts))
    s_out = [d["text"] for d in s_gen]
    t_items, t_m = kind.score(gold, [t or "" for t in t_out], schema=schema)
    s_items, s_m = kind.score(gold, s_out, schema=schema)
    primary = kind.metric
    t_score, s_score = float(t_items.mean()), float(s_items.mean())

    st = {**time_text_student(student, texts, task.evaluate.n_single), "batched_ms_per_item": batched_s * 1000,
          "items_per_s_batched": 1.0 / batched_s if batched_s else None, "batch_size": task.student.batch_size}
    tt = teacher_timing(task, out, gen_stats)
    t_ms, s_ms = tt["p50_ms"], st["p50_ms"]
    cost = cost_block(task, gen_stats, train_stats, teacher_usd_per_call(task, out, (t_ms or 0.0) / 1000), s_ms,
                      "generation wall time")
    if t_score > 0:
        retained, retained_ci = s_score / t_score, list(M.paired_ratio_ci(s_items, t_items))
    else:
        retained = retained_ci = None
    speedup = t_ms / s_ms if (t_ms and s_ms) else None
    tb = tt.get("batched_ms_per_item")
    report = {
        "task": task.name, "kind": task.kind, "metric": primary, "n_eval": len(gold),
        "teacher": {"name": gen_stats["teacher"], "score": t_score, "score_ci": t_m[f"{primary}_ci"],
                    "ms_per_item": t_ms, "ms_per_item_p95": tt["p95_ms"], "ms_per_item_batched": tb,
                    "items_per_s_batched": tt["items_per_s_batched"], "usd_per_1k": cost["teacher_usd_per_1k"],
                    "usd_per_month": cost["teacher_usd_per_month"], "timing_source": tt["source"],
                    "failed_answers": int(sum(t is None for t in t_out)),
                    **({"json_validity": t_m["json_validity"]} if kind.json else {})},
        "student": {"name": student_name(student, task), "score": s_score, "score_ci": s_m[f"{primary}_ci"],
                    "agreement": None, "ms_per_item": s_ms, "ms_per_item_p95": st["p95_ms"],
                    "ms_per_item_batched": st["batched_ms_per_item"], "items_per_s_batched": st["items_per_s_batched"],
                    "usd_per_1k": cost["student_usd_per_1k"], "usd_per_month": cost["student_usd_per_month"],
                    "params": student.n_params,
                    "n_train": train_stats["n_train"],
                    **({"json_validity": s_m["json_validity"]} if kind.json else {})},
        "retained": retained, "retained_ci": retained_ci, "speedup": speedup,
        "speedup_batched": (tb / st["batched_ms_per_item"]) if (tb and st["batched_ms_per_item"]) else None,
        "metrics": {"teacher": t_m, "student": s_m},
        "paired": {**M.paired_test(s_items, t_items, False), "a": "student", "b": "teacher"},
        "fidelity": _fidelity(kind, t_out, s_out),
        "latency": {"student": st, "teacher": tt},
        "cost": cost,
        "data": {"teacher_labelled": gen_stats["n_inputs"], "curated": read_json(out / "curate" / "stats.json"),
                 "train": train_stats},
        "machine": machine_info(), "generate_fingerprint": gen["fingerprint"],
        "examples": worst_text_errors(texts, gold, t_out, s_out, t_items, s_items),
        "errors": {"student": int((s_items < 1).sum()),
                   "copied_from_teacher": int(sum(s_items[i] < 1 and s_out[i] == t_out[i] for i in range(len(gold))))},
    }
    from protege.stages.evaluate.runtime import runtime_report

    rt = runtime_report(student, kind, texts, s_gen, n_ref=task.evaluate.reference_items, n_single=task.evaluate.n_single)
    report["student"]["runtime"] = rt
    if rt.get("reference_latency") and s_ms:
        rt["latency_vs_reference"] = s_ms / rt["reference_latency"]["p50_ms"]
    report["student"]["agreement"] = report["fidelity"]["agreement"]
    report["student"]["agreement_ci"] = report["fidelity"]["agreement_ci"]
    notes = null_notes(report)
    if notes:
        report["notes"] = notes
    if task.evaluate.judge and kind.judged:
        report["judge"] = run_judge(task, out, texts, t_out, s_out, gold)
    report["verdict"] = gate(report, text_verdict(report), max_ms=explicit_max_ms(task),
                             usd_per_hour=task.student.usd_per_hour)
    items = [{"id": g["id"], "gold": y, "teacher": tp, "student": sp, "teacher_score": float(ts),
              "student_score": float(ss), "student_confidence": None}
             for g, y, tp, sp, ts, ss in zip(gold_rows, gold, t_out, s_out, t_items, s_items)]
    return write_outputs(out, report, items, {"stage": "evaluate", "task": task.name, "fingerprint": EVALUATE.key(
        task, upstream=fingerprint([gen["fingerprint"], train_cfg.get("fingerprint")]))})


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
  optimistic by the noise of that pick: the curve is there to show how flat it is around ``t``. With
  ``serve.risk`` the gateway uses the risk gate instead (certified on out-of-fold rows, not gold):
  ``cascade.risk_gate`` holds its promise and what it delivers on gold (:mod:`.risk`).
- **Speed and cost on this machine, in this run**: student latency one item at a time (p50/p95) and
  batched throughput; the teacher's from the generate stage (a local model timed there, an API
  teacher's per-call wall time from the ledger); $ per 1k calls, per month, months to break even.

Artifacts: ``report.json`` + ``report.html`` at the run root (the DESIGN.md contract), and
``evaluate/items.jsonl`` — one row per gold item — which ``protege evaluate --compare`` pairs across runs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from protege import metrics as M
from protege.stages.evaluate.economics import explicit_max_ms, gate, speed_phrase
from protege.kinds import kind_of
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
from protege.stages.evaluate.ladder import (
    labels_sentence,
    ladder_block,
    learning_curve_block,
    per_label_recall,
    usd_per_label,
)
from protege.stages.keys import EVALUATE
from protege.task import TaskSpec
from protege.timing import measure

CASCADE_TARGET = 0.99  # share of the teacher's quality the cascade must keep


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


def quality(task: TaskSpec, gold: list[str], t_pred: list, s_pred: list, s_proba: np.ndarray | None,
            t_probs: list | None) -> dict:
    """Everything about quality: metrics by kind, paired test, fidelity, calibration, cascade."""
    kind, labels = kind_of(task), task.labels
    t_items, t_m = kind.score(gold, t_pred, labels=labels)
    s_items, s_m = kind.score(gold, s_pred, labels=labels)
    binary = True  # right / wrong items: McNemar
    agree = np.array([a == b for a, b in zip(s_pred, t_pred)], dtype=float)
    fidelity: dict = {"agreement": float(agree.mean()), "agreement_ci": list(M.bootstrap_ci(agree))}
    if s_proba is not None and t_probs is not None:
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
                        "needed": pick["needed"], "metric": kind.metric, "confidence": "student max probability",
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
        fast = speed_phrase(r.get("speedup"))
        return {"decision": "ship", "text": f"Ship the student: it is {how} the teacher "
                f"({ret:.1%} of its {r['metric']}, {p['test']} p = {p['p_value']:.2g}){fast}."}
    if cas.get("coverage", 0) >= 0.5:
        return {"decision": "cascade", "text": f"Ship behind a cascade: answering only when confidence ≥ "
                f"{cas['threshold']:.2f} covers {cas['coverage']:.0%} of traffic and keeps {CASCADE_TARGET:.0%} of the "
                f"teacher's {r['metric']}; alone the student keeps {ret:.1%} (p = {p['p_value']:.2g})."}
    return {"decision": "not yet", "text": f"Not yet: the student keeps {ret:.1%} of the teacher's {r['metric']} "
            f"(p = {p['p_value']:.2g}) and a cascade at {CASCADE_TARGET:.0%} would cover only "
            f"{cas.get('coverage', 0):.0%} of traffic. More or better-curated teacher labels first."}


def _ladder_keys(task, out, train_stats, texts, gold, t_pred, s_items, s_ms, cost, tt, metrics) -> dict:
    """per_label_recall always; ladder / learning_curve / labels_to_buy only when train wrote a ladder."""
    lad = train_stats.get("ladder") or {}
    keys = {"per_label_recall": per_label_recall(task.labels, metrics, lad.get("rungs"), lad.get("chosen"))}
    ladder = ladder_block(task, out / "train", train_stats, texts, gold, t_pred, s_items, s_ms)
    if ladder:
        keys["ladder"] = ladder
    usd, basis = usd_per_label(task, cost, tt)
    curve, buy = learning_curve_block(train_stats, train_stats.get("n_train"), usd, basis)
    if curve:
        keys["learning_curve"] = curve
    if buy:
        keys["labels_to_buy"] = buy
    return {k: v for k, v in keys.items() if v is not None}


def evaluate_classify(task: TaskSpec, out: Path) -> dict:
    out = Path(out)
    train_cfg, gen, gold_rows, trows, gen_stats, train_stats, student = eval_inputs(task, out)
    texts, gold = [g["text"] for g in gold_rows], [g["label"] for g in gold_rows]
    t_pred = [r.get("label") for r in trows]
    t_probs = [r.get("probs") for r in trows]
    t_conf = [r.get("confidence") if r.get("status") == "ok" else None for r in trows]
    s_pred, s_proba = student_outputs(student, texts, task.labels)
    s_conf = None if s_proba is None else s_proba.max(1)
    q = quality(task, gold, t_pred, s_pred, s_proba, t_probs)
    if s_proba is not None and q.get("cascade") is not None:
        from protege.stages.evaluate.risk import risk_block

        q["cascade"]["risk_gate"] = risk_block(task, out, s_proba, t_pred, gold)
    t_items, s_items = q.pop("t_items"), q.pop("s_items")
    q.pop("agree")
    primary = kind_of(task).metric
    t_score, s_score = float(t_items.mean()), float(s_items.mean())

    st = time_student(student, texts)
    tt = teacher_timing(task, out, gen_stats)
    t_ms, s_ms = tt["p50_ms"] or float("nan"), st["p50_ms"]
    cost = cost_block(task, gen_stats, train_stats, teacher_usd_per_call(task, out, t_ms / 1000), s_ms, "wall time")
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
        "data": {"teacher_labelled": gen_stats["n_inputs"], "curated": read_json(out / "curate" / "stats.json"),
                 "train": train_stats},
        "machine": machine_info(), "generate_fingerprint": gen["fingerprint"],
        "examples": worst_errors(texts, gold, t_pred, s_pred, s_items, s_conf, t_conf),
        "errors": {"student": int((s_items < 1).sum()),
                   "copied_from_teacher": int(sum(s_items[i] < 1 and s_pred[i] == t_pred[i] for i in range(len(gold))))},
    }
    if gen_stats.get("active"):  # generate.strategy: active — the agreement-vs-calls curve of the labelling rounds
        report["active"] = gen_stats["active"]
    report.update(_ladder_keys(task, out, train_stats, texts, gold, t_pred, s_items, s_ms, cost, tt, q["metrics"]))
    if report.get("ladder", {}).get("chosen"):
        report["student"]["name"] += f" (auto: {report['ladder']['chosen']})"
    notes = null_notes(report)
    if notes:
        report["notes"] = notes
    report["verdict"] = gate(report, verdict(report), max_ms=explicit_max_ms(task),
                             usd_per_hour=task.student.usd_per_hour)
    if report.get("labels_to_buy"):
        optimistic = bool(report["learning_curve"].get("fit_note"))
        report["verdict"]["text"] += " " + labels_sentence(report["labels_to_buy"], optimistic)
    items = [{"id": g["id"], "gold": y, "teacher": tp, "student": sp, "teacher_score": float(ts),
              "student_score": float(ss), "student_confidence": None if s_conf is None else float(s_conf[i])}
             for i, (g, y, tp, sp, ts, ss) in enumerate(zip(gold_rows, gold, t_pred, s_pred, t_items, s_items))]
    return write_outputs(out, report, items, {"stage": "evaluate", "task": task.name, "fingerprint": EVALUATE.key(
        task, upstream=fingerprint([gen["fingerprint"], train_cfg.get("fingerprint")]))})



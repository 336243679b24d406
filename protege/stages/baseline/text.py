"""``protege baseline`` for extract / generate tasks: the weekend experiment, scored with the task's own metric.

The questions are the classify ones — is the teacher right often enough to copy, does it answer the same
question the same way, is an off-the-shelf small model already close, does a student pay for itself —
but an answer is a JSON object or a text, not a label:

- **quality**: teacher (and small model) vs gold with the kind's metric (extract: per-item field F1 with
  JSON validity and exact match; generate: ROUGE-L), bootstrap CIs, and per-field teacher errors (extract);
- **self-consistency**: repeated samples (API teachers) and prompt variants (examples reversed, the task's
  paraphrased instructions) compared by the kind's answer key (extract: the same fields and values, key
  order and spacing aside);
- **cost**: the same cost case and verdict as classify (:mod:`protege.stages.baseline.costs`), from the
  measured tokens (API) or single-item generation time (local models).
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import numpy as np

from protege.data import load_gold
from protege.kinds import kind_of
from protege.metrics import bootstrap_ci, flatten_fields
from protege.registry import capabilities, make_teacher
from protege.schema import parse_json_object
from protege.stages.baseline.checks import consistency
from protege.stages.baseline.costs import NO_SMALL_MODEL, call_costs, cost_view, close_result
from protege.stages.generate import label_with_ledger
from protege.task import TaskSpec, TeacherConfig
from protege.teachers.base import Answer
from protege.teachers.ledger import BudgetExceeded, Ledger
from protege.teachers.textgen import TextTeacher


def text_variants(task: TaskSpec) -> list[tuple[str, TaskSpec]]:
    """(name, task) pairs asking the same question differently (no label list to reorder in a text task)."""
    cfg, out = task.baseline, []
    if cfg.auto_variants and len(task.examples) >= 2:
        out.append(("examples reversed", task.model_copy(update={"examples": list(reversed(task.examples))})))
    for k, text in enumerate(cfg.instructions, 1):
        out.append((f"instruction {k}", task.model_copy(update={"instruction": text})))
    return out


def output_of(answers: list[Answer], sample: int = 0) -> str | None:
    a = answers[sample] if sample < len(answers) else None
    if a is None or a.status != "ok":
        return None
    return a.text if a.text else (a.label or "")


def field_errors(golds: list[str], preds: list[str | None]) -> dict:
    """Extract: per gold field, how often the answer misses it or gets its value wrong (worst first), in the
    shape of the classify confusion summary (``per_label`` rows are fields) so one page renders both."""
    rows: dict[str, list[int]] = {}
    wrong_items = 0
    for g, p in zip(golds, preds):
        gf = flatten_fields(parse_json_object(g) or {})
        pf = flatten_fields(parse_json_object(p) or {}) if p else {}
        wrong_items += gf != pf
        for k, v in gf.items():
            r = rows.setdefault(k, [0, 0])
            r[0] += 1
            r[1] += pf.get(k) != v
    per = [{"label": k, "n": n, "errors": e, "recall": (n - e) / n if n else None, "precision": None,
            "most_confused_with": None} for k, (n, e) in rows.items()]
    per.sort(key=lambda d: (d["recall"] if d["recall"] is not None else 2.0, -d["errors"], d["label"]))
    return {"n": len(golds), "errors": wrong_items, "per_label": per, "pairs": [], "by": "field"}


def _time_local(t: TextTeacher, texts: list[str]) -> float | None:
    """Median seconds per input answered one at a time (local models only; an API's comes from the ledger)."""
    if hasattr(t.inner, "acall") or not texts:
        return None
    t.time_generation(texts[:1])  # warm-up
    return statistics.median(t.time_generation(texts))


def _arm(task: TaskSpec, texts: list[str], ledger: Ledger, *, stage: str, samples: int, description: str,
         n_time: int) -> tuple[list[list[Answer]], dict, TextTeacher, float | None]:
    t = TextTeacher(make_teacher(task), task)
    try:
        answers, stats = label_with_ledger(t, texts, ledger, stage=stage, samples=samples,
                                           budget_usd=task.teacher.budget_usd, description=description)
        single = _time_local(t, texts[:n_time])
    finally:
        t.close()
    return answers, stats, t, single


def _scored(task: TaskSpec, golds: list[str], preds: list[str | None]) -> tuple[np.ndarray, dict]:
    return kind_of(task).score(golds, [p if p is not None else "" for p in preds], schema=task.schema_)


def baseline_text(task: TaskSpec, out: Path, *, n: int, volume: int,
                  small_cfg: TeacherConfig | None) -> tuple[dict, list[dict]]:
    """The weekend experiment on ``n`` gold items of an extract / generate task: (baseline.json's dict, the
    side-by-side items); the caller writes the folder."""
    kind, cfg = kind_of(task), task.baseline
    gold = load_gold(task)
    random.Random(task.data.seed).shuffle(gold)
    gold = gold[:n]
    texts, golds = [g["text"] for g in gold], [g["label"] for g in gold]
    n_time = max(1, min(task.evaluate.n_single, len(texts)))
    local = capabilities(task.teacher.backend).local
    repeats = 1 if local else cfg.samples
    ledger = Ledger(Path(out) / "ledger.sqlite")
    t0 = time.perf_counter()
    try:
        base, base_stats, teacher, t_single = _arm(task, texts, ledger, stage="baseline", samples=repeats,
                                                   description="teacher: gold sample", n_time=n_time)
        variants = {}
        for name, vtask in text_variants(task):
            ans, st, _, _ = _arm(vtask, texts, ledger, stage="baseline-variant", samples=1, n_time=0,
                                 description=f"teacher: {name}")
            variants[name] = {"outputs": [output_of(a) for a in ans], "stats": st}
        small = None
        if small_cfg is not None:
            stask = task.model_copy(update={"teacher": small_cfg,
                                            "examples": task.examples if cfg.small_model_examples else []})
            s_ans, s_stats, sm, s_single = _arm(stask, texts, ledger, stage="baseline-small", samples=1, n_time=n_time,
                                                description="small model: " + ("few-shot" if cfg.small_model_examples
                                                                               else "zero-shot"))
            small = {"outputs": [output_of(a) for a in s_ans], "stats": s_stats, "name": sm.display_name, "id": sm.name,
                     "cost": call_costs(small_cfg, [a[0] for a in s_ans], s_single)}
    except BudgetExceeded as e:
        raise BudgetExceeded(f"{e}. Calls made so far are in {ledger.path}; raise teacher.budget_usd or lower "
                             f"--n and run again (answered calls are not repaid)") from None
    finally:
        ledger.close()

    t_out = [output_of(a) for a in base]
    t_items, t_m = _scored(task, golds, t_out)
    keys = [kind.answer_key(o) if o is not None else None for o in t_out]
    others = {f"sample {s}": [kind.answer_key(o) if (o := output_of(a, s)) is not None else None for a in base]
              for s in range(1, repeats)}
    others.update({k: [kind.answer_key(o) if o is not None else None for o in v["outputs"]] for k, v in variants.items()})
    cons = consistency(keys, others)
    cons["repeated_samples"] = repeats
    if local:
        cons["note"] = "a local teacher decodes greedily: only prompt variants are compared"
    t_cost = call_costs(task.teacher, [a[0] for a in base], t_single)
    invalid = [kind.validity({"output": o}, schema=task.schema_) is not None if o is not None else True for o in t_out]
    result = {
        "task": task.name, "kind": task.kind, "metric": kind.metric, "n": len(gold), "labels": [],
        "teacher": {"name": teacher.display_name, "id": teacher.name, "score": float(t_items.mean()),
                    "score_ci": list(bootstrap_ci(t_items)), "metrics": t_m, "invalid_answers": int(sum(invalid)),
                    "ledger": base_stats, **cost_view(t_cost),
                    "errors": field_errors(golds, t_out) if kind.json else
                    {"n": len(gold), "errors": 0, "per_label": [], "pairs": []}},
        "consistency": cons,
        "variants": {k: {"agreement_with_teacher": cons["agreement_with_base"].get(k),
                         "score": float(_scored(task, golds, v["outputs"])[0].mean()), "ledger": v["stats"]}
                     for k, v in variants.items()},
    }
    s_ok = None
    if small is not None:
        s_items, s_m = _scored(task, golds, small["outputs"])
        s_ok = s_items
        agree = np.array([kind.same_answer(a, b) for a, b in zip(small["outputs"], t_out)], dtype=float)
        result["small_model"] = {
            "name": small["name"], "id": small["id"], "shots": "few-shot" if cfg.small_model_examples else "zero-shot",
            "score": float(s_items.mean()), "score_ci": list(bootstrap_ci(s_items)), "metrics": s_m,
            "agreement_with_teacher": float(agree.mean()), "agreement_ci": list(bootstrap_ci(agree)),
            "of_teacher": float(s_items.mean() / t_items.mean()) if t_items.mean() else None,
            "invalid_answers": int(sum(kind.validity({"output": o}, schema=task.schema_) is not None
                                       if o is not None else True for o in small["outputs"])),
            "ledger": small["stats"], **cost_view(small["cost"])}
    else:
        result["small_model"] = {"skipped": NO_SMALL_MODEL}
    close_result(result, task, out, texts, small, t_cost, volume, t0)
    items = []
    for i, g in enumerate(gold):
        it = {"id": g["id"], "text": g["text"], "gold": g["label"], "teacher": t_out[i],
              "teacher_score": float(t_items[i]),
              "samples": [output_of(base[i], s) for s in range(1, repeats)],
              "variants": {k: v["outputs"][i] for k, v in variants.items()},
              "ok": {"teacher": kind.same_answer(t_out[i], g["label"]),
                     **{k: kind.same_answer(v["outputs"][i], g["label"]) for k, v in variants.items()}}}
        if small is not None:
            it.update(small=small["outputs"][i], small_score=float(s_ok[i]))
            it["ok"]["small"] = kind.same_answer(small["outputs"][i], g["label"])
        items.append(it)
    result["sample"] = items[:20]
    return result, items

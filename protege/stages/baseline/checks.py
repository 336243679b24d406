"""The weekend experiment's judgements: prompt variants for self-consistency, how consistent the teacher is, and
the go / no-go verdict with its reasons."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from protege.costs import (format_months)
from protege.metrics import bootstrap_ci
from protege.task import BaselineConfig, TaskSpec
from protege.teachers.base import Answer


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


def remap(a: Answer, src: Sequence[str], dst: Sequence[str]) -> Answer:
    """An answer whose ``probs`` follow ``src`` label order, re-ordered to ``dst``."""
    if a.probs is None or list(src) == list(dst):
        return a
    pos = {lab: i for i, lab in enumerate(src)}
    return Answer(**{**a.__dict__, "probs": [a.probs[pos[lab]] for lab in dst]})


def calibration_vector(answers: Sequence[Sequence[Answer]]) -> np.ndarray | None:
    raw = [a.probs for item in answers for a in item if a.status == "ok" and a.probs is not None]
    return np.mean(np.array(raw), axis=0) if raw else None


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

"""The cascade's stated guarantee, checked on gold: the risk gate's promise next to what it delivers there.

The gate (:func:`protege.serve.gates.served_threshold`) is certified on the train stage's out-of-fold calibration
set — teacher-labelled rows the scoring model never trained on — not on gold, so gold is a fair test of it:
``risk`` (disagreement with the teacher among answered gold items, with a Clopper–Pearson 95% interval),
coverage, and accuracy on gold of the answered items and of the whole cascade (teacher on the rest).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _cp(k: int, n: int) -> list[float] | None:
    from scipy.stats import beta

    if not n:
        return None
    return [0.0 if k == 0 else float(beta.ppf(0.025, k, n - k + 1)), 1.0 if k == n else float(beta.ppf(0.975, k + 1, n - k))]


def risk_block(task, out: Path, s_proba: np.ndarray, t_pred: list, gold: list) -> dict | None:
    """report.json → cascade.risk_gate, or None when the run has no calibration set (student.kind other than auto)."""
    from protege.serve.gates import risk_gate_for

    s = task.serve
    got = risk_gate_for(Path(out), s.risk, s.delta)
    if got is None:
        return None
    gate, source = got
    labels = task.labels
    conf = s_proba.max(1)
    s_pred = [labels[i] for i in s_proba.argmax(1)]
    answered = conf >= gate.threshold
    have_t = np.array([t is not None for t in t_pred])
    agree = np.array([a == b for a, b in zip(s_pred, t_pred)])
    s_right = np.array([a == g for a, g in zip(s_pred, gold)])
    t_right = np.array([a == g for a, g in zip(t_pred, gold)])
    m = answered & have_t
    n_ans, k = int(m.sum()), int((m & ~agree).sum())
    risk = k / n_ans if n_ans else None
    return {**gate.to_json(), "calibration": source,
            "gold": {"n": len(gold), "n_answered": int(answered.sum()), "coverage": float(answered.mean()),
                     "risk": risk, "risk_ci": _cp(k, n_ans), "held": None if risk is None else bool(risk <= gate.risk),
                     "student_accuracy_answered": float(s_right[answered].mean()) if answered.any() else None,
                     "cascade_accuracy": float(np.where(answered, s_right, t_right).mean()),
                     "teacher_accuracy": float(t_right.mean())}}

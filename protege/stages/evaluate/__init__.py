"""Stage 5: teacher and student on the same held-out gold items, scored the way the task kind needs.

``classify``: accuracy / macro-F1 with bootstrap CIs, fidelity, calibration, the cascade, per-label recall.
``extract`` / ``generate``: field F1 / exact match / JSON validity, or ROUGE-L / chrF, plus an optional
LLM judge. Both write the same report.json keys (:mod:`protege.stages.evaluate.common`), so report.html,
compare and serve read one shape.
"""

from __future__ import annotations

from pathlib import Path

from protege.stages.evaluate.classify import evaluate_classify
from protege.stages.evaluate.text import evaluate_text
from protege.task import TaskSpec

BY_KIND = {"classify": evaluate_classify, "extract": evaluate_text, "generate": evaluate_text}


def evaluate(task: TaskSpec, out: Path) -> dict:
    """Score the run in ``out`` on the task's gold file; writes ``out/evaluate/report.json`` + ``report.html``."""
    return BY_KIND[task.kind](task, Path(out))


__all__ = ["evaluate"]

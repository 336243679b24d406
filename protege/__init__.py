"""protege: distil an expensive model's narrow task into a small, fast student, with numbers to prove it.

The library API (the ``protege`` command is a thin layer over it)::

    import protege

    task = protege.Task.from_yaml("task.yaml")      # or protege.Task.from_dict({...})
    result = protege.run(task, "runs/my-task")      # generate → curate → train → evaluate, cached
    print(result.report.retained, result.report.student.score_ci)
    student = protege.load_student(result.paths["student"])
    student.predict(["I was charged twice"])

Names are imported on first use, so ``import protege`` stays cheap (no torch / transformers until a
stage needs them). Model files are never fetched from a hub at run time: ``HF_HUB_OFFLINE`` defaults to
1 (set it to 0 before importing protege to allow downloads).
"""

from __future__ import annotations

import os
from importlib import import_module

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"

_API = {
    "Task": "protege.task:TaskSpec",
    "TaskError": "protege.task:TaskError",
    "load_task": "protege.task:load_task",
    "run": "protege.pipeline:run",
    "RunResult": "protege.pipeline:RunResult",
    "Report": "protege.reporting.model:Report",
    "load_student": "protege.registry:load_student",
    "generate": "protege.stages.generate:generate",
    "curate": "protege.stages.curate:curate",
    "train": "protege.stages.train:train",
    "evaluate": "protege.stages.evaluate:evaluate",
    "baseline": "protege.stages.baseline:baseline",
    "export": "protege.export:export",
    "demo_task": "protege.demo:demo_task",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    try:
        mod, _, attr = _API[name].partition(":")
    except KeyError:
        raise AttributeError(f"module 'protege' has no attribute {name!r}") from None
    value = getattr(import_module(mod), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

"""``run``: generate → curate → train → evaluate, each skipped when its artifact is up to date."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protege.reporting.model import Report
from protege.task import TaskSpec, load_task, parse_task

STAGES = ("generate", "curate", "train", "evaluate")


@dataclass
class RunResult:
    """What :func:`run` gives back: the report, where everything was written, and each stage's stats."""

    out: Path
    report: Report
    stats: dict[str, dict] = field(default_factory=dict)  # generate / curate / train stats.json

    @property
    def paths(self) -> dict[str, Path]:
        """The files a user opens next: the report pages, the student folder, the ledger."""
        ev = self.out / "evaluate"
        return {"report_json": ev / "report.json", "report_html": ev / "report.html",
                "student": self.out / "train" / "student", "ledger": self.out / "ledger.sqlite"}

    @classmethod
    def read(cls, out: str | Path) -> "RunResult":
        """The result of a finished run folder."""
        out = Path(out)
        stats = {}
        for stage in STAGES[:-1]:
            f = out / stage / "stats.json"
            if f.is_file():
                stats[stage] = json.loads(f.read_text(encoding="utf-8"))
        return cls(out=out, report=Report.load(out), stats=stats)


def as_task(task: TaskSpec | str | Path | dict[str, Any]) -> TaskSpec:
    """A TaskSpec from a TaskSpec, a task file path, or a dict (relative data paths from the cwd)."""
    if isinstance(task, TaskSpec):
        return task
    if isinstance(task, dict):
        return parse_task(task, "<dict>", Path.cwd())
    return load_task(task)


def default_out(task: TaskSpec) -> Path:
    return Path("runs") / task.name


def run(task: TaskSpec | str | Path | dict, out: str | Path | None = None, *, force: bool = False) -> RunResult:
    """Run every stage of ``task`` into ``out`` (default ``runs/<task name>``); up-to-date stages are skipped,
    and every teacher call goes through the run's ledger (a re-run pays for nothing twice)."""
    from protege.stages.curate import curate
    from protege.stages.evaluate import evaluate
    from protege.stages.generate import generate
    from protege.stages.train import train

    task = as_task(task)
    out = Path(out or default_out(task)).absolute()
    generate(task, out, force=force)
    curate(task, out, force=force)
    train(task, out, force=force)
    evaluate(task, out)
    return RunResult.read(out)

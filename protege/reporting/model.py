"""report.json as a typed object: the contract keys (DESIGN.md) typed, everything else kept as it is.

``evaluate`` builds the report once as a dict (one writer for every task kind) and writes it; this model
is how code reads it back — ``Report.load(path)``, ``report.retained``, ``report.student.score_ci`` — with
the extra keys (baselines, calibration, cascade, per-label, judge, ...) still there via ``model_extra``.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class ModelScore(_Open):
    """One model's row: its score on the gold items with a 95% bootstrap CI, latency and price."""

    name: str
    score: float | None = None
    score_ci: list[float | None] | None = None
    ms_per_item: float | None = None
    usd_per_1k: float | None = None


class StudentScore(ModelScore):
    agreement: float | None = None  # share of gold items where student and teacher give the same answer
    params: int | None = None


class Report(_Open):
    """Teacher and student on the same held-out gold items (``n_eval``), scored by ``metric``."""

    task: str
    kind: str
    metric: str
    n_eval: int
    teacher: ModelScore
    student: StudentScore
    retained: float | None = None  # student score / teacher score
    speedup: float | None = None   # teacher ms per item / student ms per item, measured in the same run

    @classmethod
    def load(cls, path: str | Path) -> "Report":
        """Read ``report.json`` (or the ``evaluate`` folder / run folder that holds it)."""
        p = Path(path)
        for cand in (p, p / "report.json", p / "evaluate" / "report.json"):
            if cand.is_file():
                return cls.model_validate(json.loads(cand.read_text(encoding="utf-8")))
        raise FileNotFoundError(f"{p}: no report.json here (run `protege evaluate` first)")

    def to_dict(self) -> dict:
        """The report as report.json holds it (all keys)."""
        return self.model_dump(mode="json")

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


class LadderRung(_Open):
    """One rung of the student ladder: its CV agreement with the teacher (what chose) and, reported after the
    choice, its gold score, paired p against the chosen student and latency measured in the evaluate run."""

    name: str
    cv_agreement: float | None = None
    score: float | None = None
    score_ci: list[float | None] | None = None
    p_vs_chosen: float | None = None
    ms_p50: float | None = None
    size_bytes: int | None = None
    train_s: float | None = None
    eligible: bool | None = None
    chosen: bool = False


class Ladder(_Open):
    """``student.kind: auto``: the rungs train compared and why ``chosen`` won (on teacher-labelled folds)."""

    chosen: str | None = None
    why: str | None = None
    rungs: list[LadderRung] = []


class LabelsToBuy(_Open):
    """Expected agreement with the teacher after labelling ``more`` inputs (learning-curve extrapolation)."""

    more: int
    expected_agreement: float | None = None
    gain: float | None = None  # in agreement (0-1) over the fit at the labels trained on
    usd: float | None = None   # teacher $ for those labels at the measured $ per labelled input


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
    ladder: Ladder | None = None   # only when the student was chosen by the ladder (student.kind: auto)
    labels_to_buy: list[LabelsToBuy] | None = None

    @classmethod
    def load(cls, path: str | Path) -> "Report":
        """Read ``report.json`` (or the ``evaluate`` folder / run folder that holds it)."""
        p = Path(path)
        for cand in (p, p / "report.json", p / "evaluate" / "report.json"):
            if cand.is_file():
                return cls.model_validate(json.loads(cand.read_text(encoding="utf-8")))
        raise FileNotFoundError(f"{p}: no report.json here (run `protege evaluate` first)")

    def to_dict(self) -> dict:
        """The report as report.json holds it (all keys; a typed key the file lacks, such as ``ladder`` for a
        student not chosen by the ladder, stays absent rather than appearing as null)."""
        return self.model_dump(mode="json", exclude_unset=True)

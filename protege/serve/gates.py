"""The gateway's gates, read from a run folder: a risk gate per student level, an OOD gate, and the level chain.

- **Risk gate** (:func:`risk_gate_for`): :func:`protege.serve.conformal.gate_from_probs` on the level's out-of-fold
  calibration set — ``train/calibration.npz`` for the rung the ladder chose (written by the train stage), else
  ``train/calibration/<rung>.npz`` (every other rung the ladder trained, saved by the train stage), else
  ``calibrate/<rung>.npz``, which :func:`calibrate_rung` writes by re-running that rung's cross-validation with the
  settings the ladder chose for it (the refitted ``train/ladder/<rung>/`` student saw every row, so its own
  confidences on them would be optimistic; the out-of-fold ones are not).
- **OOD gate** (:class:`OodGate`): cosine distance from an input's embedding (the level's own featurizer) to the
  nearest training input, escalated above the split-conformal threshold of held-out training inputs.
- **Levels** (:func:`build_levels`): ``serve.levels`` names rungs (``train/ladder/<name>``) or student folders; the
  gateway tries them in order, each behind its own gates, and escalates past the last.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protege.serve.conformal import RiskGate, fit_ood, gate_from_probs, nearest_distance

log = logging.getLogger("protege.serve")


def embed_fn(student):
    """The student's own input embedding: the static student's ``encode``, the frozen student's encoder; else None."""
    enc = getattr(student, "encode", None)
    if enc is None and getattr(student, "encoder", None) is not None:
        enc = getattr(student.encoder, "encode", None)
    return enc


@dataclass
class OodGate:
    """Escalate inputs farther from every training input than all but ``alpha`` of held-out training inputs."""

    reference: np.ndarray  # embeddings of the training inputs
    threshold: float
    alpha: float
    n_calibration: int

    @classmethod
    def fit(cls, embed, texts: list[str], alpha: float, seed: int = 0) -> "OodGate":
        X = np.asarray(embed(list(texts)), dtype=np.float32)
        g = fit_ood(X, alpha, seed=seed)
        return cls(X, g["threshold"], alpha, g["n_calibration"])

    def distance(self, emb: np.ndarray) -> np.ndarray:
        return nearest_distance(np.atleast_2d(emb), self.reference)

    def familiar(self, emb) -> tuple[bool, float]:
        d = float(self.distance(emb)[0])
        return d <= self.threshold, d

    def to_json(self) -> dict:
        return {"alpha": self.alpha, "threshold": self.threshold if math.isfinite(self.threshold) else None,
                "n_reference": len(self.reference), "n_calibration": self.n_calibration}


def load_calibration(run: Path, rung: str | None = None) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(probs, teacher, source) of ``rung`` (None: the chosen student), or None when there is none yet."""
    run = Path(run)
    main = run / "train" / "calibration.npz"
    if main.is_file():
        z = np.load(main)
        if rung is None or str(z["rung"]) == rung:
            return z["probs"], z["teacher"], "train/calibration.npz (out-of-fold)"
    if rung is not None and (run / "train" / "calibration" / f"{rung}.npz").is_file():  # saved by the ladder
        z = np.load(run / "train" / "calibration" / f"{rung}.npz")
        return z["probs"], z["teacher"], f"train/calibration/{rung}.npz (out-of-fold)"
    if rung is not None and (run / "calibrate" / f"{rung}.npz").is_file():
        z = np.load(run / "calibrate" / f"{rung}.npz")
        return z["probs"], z["teacher"], f"calibrate/{rung}.npz (out-of-fold)"
    return None


def risk_gate_for(run: Path | None, risk: float | None, delta: float, rung: str | None = None) -> tuple[RiskGate, str] | None:
    if run is None or risk is None:
        return None
    cal = load_calibration(run, rung)
    if cal is None:
        return None
    probs, teacher, source = cal
    gate = gate_from_probs(probs, teacher, risk, delta)
    if not gate.feasible:
        log.warning("risk %.3g at delta %.3g cannot be certified on %s (%d items): every request escalates",
                    risk, delta, source, gate.n_cal)
    return gate, source


def train_texts(run: Path) -> list[str]:
    from protege.data import read_jsonl

    p = Path(run) / "curate" / "train.jsonl"
    return [r["text"] for r in read_jsonl(p)] if p.is_file() else []


def calibrate_rung(task, run: Path, rung: str) -> Path:
    """Out-of-fold probabilities of ladder rung ``rung`` on the curated rows → ``<run>/calibrate/<rung>.npz``.

    Same folds and settings as the ladder (``train/stats.json``), no temperature (the saved non-chosen rungs have
    none either), so the gate is calibrated on exactly the mapping the gateway serves.
    """
    import json

    from protege.data import read_jsonl
    from protege.stages.train.auto import unlabelled_pool
    from protege.students.ladder import build_rungs, stratified_folds
    from protege.students.rungs import Data

    run = Path(run)
    stats = json.loads((run / "train" / "stats.json").read_text(encoding="utf-8"))
    ladder = stats.get("ladder") or {}
    entry = next((r for r in ladder.get("rungs", []) if r["name"] == rung and r.get("params") is not None), None)
    if entry is None:
        raise ValueError(f"{run}/train/stats.json has no trained ladder rung {rung!r}; trained: "
                         f"{[r['name'] for r in ladder.get('rungs', []) if r.get('params') is not None]}")
    rows = read_jsonl(run / "curate" / "train.jsonl")
    labels = task.labels
    d = Data(texts=[r["text"] for r in rows], P=np.array([r["probs"] for r in rows], dtype=np.float32),
             hard=np.array([labels.index(r["label"]) for r in rows]),
             weight=np.array([float(r.get("weight", 1.0)) for r in rows], dtype=np.float32), labels=list(labels),
             pool=unlabelled_pool(task) if rung == "static-distilled" else [], alpha=task.train.alpha,
             temperature=task.train.temperature, max_iter=task.train.max_iter, seed=task.train.seed)
    rungs = {r.name: r for r in build_rungs(task, d, [rung])}
    target = rungs[rung]
    if hasattr(target, "bind"):
        params = {r["name"]: r["params"] for r in ladder["rungs"] if r.get("params") is not None}
        target.bind(rungs, params)
        for r in rungs.values():
            if r is not target:
                r.prepare()
    target.prepare()
    z = target.cv(stratified_folds(d.hard, int(ladder["folds"]), d.seed), [entry["params"]])[0]
    seen = np.isfinite(z).all(1)
    zc = np.where(seen[:, None], z, 0.0)
    P = np.exp(zc - zc.max(1, keepdims=True))
    P = np.where(seen[:, None], P / P.sum(1, keepdims=True), np.nan).astype(np.float32)
    out = run / "calibrate" / f"{rung}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.npz")
    np.savez(tmp, probs=P, teacher=d.hard.astype(np.int64), rung=rung)
    os.replace(tmp, out)  # atomic: a killed run leaves no half file that looks whole
    return out


@dataclass
class Level:
    """One student in the chain: its predictor, its certified threshold, its OOD gate (or None)."""

    name: str
    predictor: object
    threshold: float
    source: str
    gate: RiskGate | None = None
    ood: OodGate | None = None

    def passes(self, confidence: float, text: str, emb=None) -> tuple[bool, float | None]:
        """(answer here?, OOD distance or None); ``emb``: the input's embedding when already computed."""
        if confidence < self.threshold:
            return False, None
        if self.ood is None:
            return True, None
        if emb is None:
            emb = embed_fn(self.predictor.student)([text])[0]
        return self.ood.familiar(emb)

    def info(self) -> dict:
        return {"name": self.name, "threshold": self.threshold if math.isfinite(self.threshold) else None,
                "source": self.source, **({"gate": self.gate.to_json()} if self.gate else {}),
                **({"ood": self.ood.to_json()} if self.ood else {})}


def level_folder(run: Path | None, name: str) -> Path:
    p = Path(name)
    if (p / "config.json").is_file() or run is None:
        return p
    return Path(run) / "train" / "ladder" / name


def make_ood(run: Path | None, predictor, alpha: float | None, seed: int = 0) -> OodGate | None:
    if alpha is None or run is None or predictor is None or getattr(predictor, "is_lm", False):
        return None
    enc = embed_fn(predictor.student)
    texts = train_texts(run)
    if enc is None or len(texts) < 2:
        log.warning("OOD gate off: %s", "the student has no embedding" if enc is None else "no curate/train.jsonl")
        return None
    return OodGate.fit(enc, texts, alpha, seed)


def build_levels(task, run: Path | None, s, name: str, max_tokens: int) -> list[Level]:
    """The chain ``serve.levels`` names, each with its risk gate (hand ``serve.threshold`` applies to the first
    only) and OOD gate. A level without a calibration set is calibrated now (:func:`calibrate_rung`)."""
    from protege.serve.predictor import load_predictor

    out = []
    for i, lv in enumerate(s.levels or []):
        folder = level_folder(run, lv)
        pred = load_predictor(folder, name, max_tokens)
        rung = Path(lv).name
        if i == 0 and s.threshold is not None:
            thr, src, gate = float(s.threshold), "serve.threshold", None
        else:
            got = risk_gate_for(run, s.risk, s.delta, rung)
            if got is None and run is not None and s.risk is not None and (Path(run) / "train" / "stats.json").is_file():
                calibrate_rung(task, run, rung)
                got = risk_gate_for(run, s.risk, s.delta, rung)
            if got is None:
                raise FileNotFoundError(f"serve.levels: no calibration set for level {lv!r} (looked for "
                                        f"train/calibration.npz and calibrate/{rung}.npz under {run}); set serve.risk "
                                        f"and train with student.kind: auto, or give the level a hand threshold")
            gate, src = got
            thr = gate.threshold
            if not gate.feasible:
                log.warning("serve.risk %.3g at delta %.3g cannot be certified for level %s on %s: it never answers",
                            s.risk, s.delta, lv, src)
        out.append(Level(rung, pred, thr, src, gate, make_ood(run, pred, s.ood_alpha)))
    return out


def next_level(levels: list[Level], text: str):
    """(level, prediction, OOD distance) of the first level whose gates pass ``text``, else None."""
    for lv in levels:
        q = lv.predictor.predict([text])[0]
        ok, dist = lv.passes(q.confidence, text)
        if ok:
            return lv, q, dist
    return None


def served_threshold(run: Path | None, s, report: dict | None) -> tuple[float, str, RiskGate | None]:
    """(threshold, where it came from, risk gate or None): a hand ``serve.threshold``, else the risk gate certified
    for ``serve.risk`` / ``serve.delta`` on the out-of-fold calibration set, else evaluate's pick in report.json,
    else ``serve.default_threshold``."""
    if s.threshold is not None:
        return float(s.threshold), "serve.threshold", None
    got = risk_gate_for(run, s.risk, s.delta)
    if got is not None:
        return got[0].threshold, f"risk gate (eps={s.risk}, delta={s.delta}) on {got[1]}", got[0]
    if s.risk is not None and run is not None and (Path(run) / "train").is_dir():
        log.warning("serve.risk is set but %s/train has no out-of-fold calibration set (written by student.kind: "
                    "auto): no risk guarantee, the threshold comes from report.json or serve.default_threshold", run)
    t = ((report or {}).get("cascade") or {}).get("threshold")
    if t is not None:
        return float(t), "report.json (evaluate)", None
    return float(s.default_threshold), "serve.default_threshold", None


def shadow_risk(store, threshold: float, risk: float | None, window: int = 1000) -> dict | None:
    """The promise re-checked on live traffic: disagreement with the teacher among shadow checks of answers the gate
    lets through now (confidence ≥ threshold). "broken" only when the 95% Clopper–Pearson interval lies above ε."""
    from scipy.stats import beta

    rows = store.query("SELECT student_confidence, agree FROM shadow WHERE agree IS NOT NULL ORDER BY id DESC LIMIT ?",
                       (window,))
    ans = [int(a) for c, a in rows if c is not None and c >= threshold]
    n, k = len(ans), len(ans) - sum(ans)
    if risk is None:
        return None
    lo = 0.0 if k == 0 else float(beta.ppf(0.025, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(0.975, k + 1, n - k))
    status = "too few" if n < 30 else ("broken" if lo > risk else "holds")
    return {"promised_risk": risk, "n": n, "disagreements": k, "risk": k / n if n else None,
            "risk_ci": [lo, hi] if n else None, "status": status, "threshold": threshold}

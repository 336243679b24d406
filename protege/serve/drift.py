"""Is the student still the model it was when it was evaluated? Live agreement and input drift.

Three signals, each compared with the same quantity on the training data / evaluation:

- **shadow agreement** — on a random sample of student-answered requests the teacher is asked too (in the
  background); the share where both agree, with a Wilson interval, against the agreement ``evaluate``
  measured on gold. The direct measure of what matters, but it costs teacher calls.
- **confidence PSI** — population stability index between the student's confidence on the training
  inputs and on recent traffic (10 quantile bins of the reference). Free; rule of thumb: < 0.1 stable,
  0.1–0.25 moderate shift, > 0.25 a different population.
- **embedding-centroid distance** — cosine distance between the mean input embedding of the training
  inputs and of recent traffic (students that embed their input: the static one). Catches new topics
  before the confidence moves.

:func:`assess` turns them into ``ok`` / ``watch`` / ``re-distill`` with the reasons; the gateway's
``/metrics`` and ``protege drift`` show the same figures.
"""

from __future__ import annotations

import json
import math
import threading
from collections import deque
from pathlib import Path
from typing import Sequence

import numpy as np

MIN_LIVE = 100  # recent requests needed before PSI / centroid distance mean anything
MIN_SHADOW = 30


def psi(reference: Sequence[float], live: Sequence[float], bins: int = 10, eps: float = 1e-4) -> float:
    """Population stability index of ``live`` against ``reference``, on the reference's quantile bins."""
    ref, cur = np.asarray(reference, dtype=float), np.asarray(live, dtype=float)
    if len(ref) == 0 or len(cur) == 0:
        return float("nan")
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    p = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1) / len(ref)
    q = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=len(edges) + 1) / len(cur)
    p, q = np.maximum(p, eps), np.maximum(q, eps)
    return float(np.sum((q - p) * np.log(q / p)))


def unit_mean(X: np.ndarray) -> np.ndarray:
    m = np.asarray(X, dtype=np.float64).mean(0)
    return m / max(float(np.linalg.norm(m)), 1e-12)


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(1.0 - a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


class Reference:
    """The training-time side of every comparison."""

    def __init__(self, confidences: Sequence[float], centroid: np.ndarray | None = None,
                 agreement: float | None = None, n_texts: int = 0):
        self.confidences = np.asarray(confidences, dtype=float)
        self.centroid = None if centroid is None else np.asarray(centroid, dtype=float)
        self.agreement, self.n_texts = agreement, n_texts

    @classmethod
    def build(cls, predictor, texts: Sequence[str], agreement: float | None = None) -> "Reference":
        texts = list(texts)
        conf = [p.confidence for p in predictor.predict(texts)] if texts else []
        emb = predictor.embed(texts) if texts else None
        return cls(conf, unit_mean(emb) if emb is not None and len(emb) else None, agreement, len(texts))

    def to_json(self) -> dict:
        return {"confidences": [round(float(x), 6) for x in self.confidences],
                "centroid": None if self.centroid is None else [float(x) for x in self.centroid],
                "agreement": self.agreement, "n_texts": self.n_texts}

    @classmethod
    def from_json(cls, d: dict) -> "Reference":
        c = d.get("centroid")
        return cls(d.get("confidences") or [], None if c is None else np.array(c), d.get("agreement"), d.get("n_texts", 0))

    def save(self, path: Path) -> None:
        from protege.data import write_json

        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> "Reference | None":
        p = Path(path)
        return cls.from_json(json.loads(p.read_text(encoding="utf-8"))) if p.is_file() else None


def snapshot(ref: Reference | None, confidences: Sequence[float], shadow: Sequence[int],
             centroid_distance: float | None = None) -> dict:
    """The drift figures for one window of traffic (JSON-able; NaN-free: unknown is None)."""
    conf = np.asarray(confidences, dtype=float)
    k, n = int(np.sum(shadow)), len(shadow)
    lo, hi = wilson(k, n)
    out = {"n": int(len(conf)), "mean_confidence": float(conf.mean()) if len(conf) else None,
           "psi": None, "centroid_distance": centroid_distance, "shadow_n": n,
           "agreement": k / n if n else None, "agreement_ci": [lo, hi] if n else None,
           "reference_agreement": None if ref is None else ref.agreement,
           "reference_mean_confidence": None if ref is None or not len(ref.confidences) else float(ref.confidences.mean())}
    if ref is not None and len(ref.confidences) and len(conf):
        out["psi"] = psi(ref.confidences, conf)
    return out


def assess(snap: dict, *, psi_alert: float = 0.25, centroid_alert: float = 0.15, agreement_drop: float = 0.05) -> dict:
    """``{"status": ok | watch | re-distill | not enough traffic, "reasons": [...]}`` for a snapshot."""
    reasons, watch, act = [], False, False
    enough = snap["n"] >= MIN_LIVE
    if enough and snap.get("psi") is not None:
        v = snap["psi"]
        if v > psi_alert:
            act = True
            reasons.append(f"confidence PSI {v:.3f} > {psi_alert}: the student's inputs look unlike its training data")
        elif v > 0.1:
            watch = True
            reasons.append(f"confidence PSI {v:.3f}: moderate shift (> 0.1)")
    if enough and snap.get("centroid_distance") is not None:
        v = snap["centroid_distance"]
        if v > centroid_alert:
            act = True
            reasons.append(f"input centroid moved {v:.3f} (cosine) > {centroid_alert}: new kinds of input")
        elif v > centroid_alert / 2:
            watch = True
            reasons.append(f"input centroid moved {v:.3f} (cosine)")
    ref_a, a = snap.get("reference_agreement"), snap.get("agreement")
    if a is not None and ref_a is not None and snap["shadow_n"] >= MIN_SHADOW:
        hi = snap["agreement_ci"][1]
        if a < ref_a - agreement_drop:
            act = True
            reasons.append(f"live agreement with the teacher {a:.1%} (n={snap['shadow_n']}, 95% CI up to {hi:.1%}) is "
                           f"below the evaluated {ref_a:.1%} by more than {agreement_drop:.0%}")
        elif hi < ref_a:
            watch = True
            reasons.append(f"live agreement {a:.1%} is significantly below the evaluated {ref_a:.1%}")
    if act:
        status = "re-distill"
    elif watch:
        status = "watch"
    elif not enough and snap["shadow_n"] < MIN_SHADOW:
        status = "not enough traffic"
        reasons.append(f"{snap['n']} requests and {snap['shadow_n']} shadow checks so far; the figures mean "
                       f"something from {MIN_LIVE} requests / {MIN_SHADOW} shadow checks")
    else:
        status = "ok"
    return {"status": status, "reasons": reasons}


class DriftMonitor:
    """Sliding windows of live confidences, input embeddings and shadow agreement (thread-safe)."""

    def __init__(self, ref: Reference | None, window: int = 1000):
        self.ref = ref
        self.conf: deque = deque(maxlen=window)
        self.emb: deque = deque(maxlen=window)
        self.shadow: deque = deque(maxlen=window)
        self.lock = threading.Lock()

    def observe(self, confidence: float | None, embedding: np.ndarray | None = None) -> None:
        with self.lock:
            if confidence is not None:
                self.conf.append(float(confidence))
            if embedding is not None:
                self.emb.append(np.asarray(embedding, dtype=np.float32))

    def observe_shadow(self, agree: bool) -> None:
        with self.lock:
            self.shadow.append(int(agree))

    def centroid_distance(self) -> float | None:
        with self.lock:
            if self.ref is None or self.ref.centroid is None or not self.emb:
                return None
            live = unit_mean(np.stack(self.emb))
        return cosine_distance(self.ref.centroid, live)

    def snapshot(self) -> dict:
        with self.lock:
            conf, shadow = list(self.conf), list(self.shadow)
        return snapshot(self.ref, conf, shadow, self.centroid_distance())


def drift_report(store, ref: Reference | None, *, window: int = 1000, **thresholds) -> dict:
    """``protege drift``: the figures recomputed from the traffic store (the centroid from the last snapshot)."""
    last = store.latest_drift()
    snap = snapshot(ref, store.recent_confidences(window), store.recent_shadow(window),
                    None if last is None else last.get("centroid_distance"))
    snap["counts"] = store.counts()
    snap["last_snapshot_ts"] = None if last is None else last["ts"]
    return {**snap, **assess(snap, **thresholds)}

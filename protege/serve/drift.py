"""Is the student still the model it was when it was evaluated? Live agreement and input drift.

Three signals, each compared with the same quantity on held-out gold inputs / the evaluation:

- **shadow agreement** — on a random sample of student-answered requests the teacher is asked too (in the
  background); the share where both agree, with a Wilson interval, against the agreement ``evaluate``
  measured on gold. The direct measure of what matters, but it costs teacher calls.
- **confidence PSI** — population stability index between the student's confidence on held-out inputs
  (the gold set: inputs it never trained on, so they look like the traffic it will see) and on recent
  traffic (quantile bins of the reference, fewer for a small reference). Free; rule of thumb: < 0.1 stable,
  0.1–0.25 moderate shift, > 0.25 a different population. A reference of *training* inputs would not do:
  a student is more confident on what it was fitted on, so ordinary traffic would always look shifted.
- **embedding-centroid distance** — cosine distance between the mean input embedding of the reference
  inputs and of recent traffic (students that embed their input: the static one). Catches new topics
  before the confidence moves. Each stored snapshot carries its session's running embedding sum, so
  ``protege drift`` recomputes the distance over the stored traffic window, across gateway sessions.

:func:`assess` turns them into ``ok`` / ``watch`` / ``re-distill`` with the reasons; the gateway's
``/metrics`` and ``protege drift`` show the same figures.
"""

from __future__ import annotations

import json
import logging
import math
import random
import threading
import uuid
from collections import deque
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger("protege.serve")

MIN_LIVE = 100  # recent requests needed before PSI / centroid distance mean anything
MIN_SHADOW = 30


def psi_bins(n_reference: int) -> int:
    """Quantile bins for a reference of n values: 10, fewer below 200 values (~20 a bin, at least 4), so the
    sampling noise of a small gold set (E[PSI] ~ (bins - 1)(1/n + 1/m) for equal populations) stays < 0.1."""
    return int(max(4, min(10, n_reference // 20)))


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


def _interp(null: Sequence[tuple], n: int) -> float | None:
    if not null or n <= 0:
        return None
    ms, qs = zip(*null)
    return float(np.interp(math.log(n), np.log(ms), qs))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


class Reference:
    """The side every live figure is compared with: the student on held-out inputs (``source``), and the
    agreement ``evaluate`` measured."""

    def __init__(self, confidences: Sequence[float], centroid: np.ndarray | None = None,
                 agreement: float | None = None, n_texts: int = 0, source: str | None = None,
                 centroid_null: Sequence[Sequence[float]] | None = None,
                 psi_null: Sequence[Sequence[float]] | None = None):
        self.confidences = np.asarray(confidences, dtype=float)
        self.centroid = None if centroid is None else np.asarray(centroid, dtype=float)
        self.agreement, self.n_texts, self.source = agreement, n_texts, source
        self.centroid_null = [tuple(x) for x in (centroid_null or [])]  # (live n, 99th percentile distance)
        self.psi_null = [tuple(x) for x in (psi_null or [])]  # (live n, 99th percentile PSI)

    def centroid_noise(self, n: int) -> float | None:
        """The centroid distance that ``n`` in-distribution requests reach by chance (99th percentile), from
        the reference's own resampling; log-interpolated between the sizes it was measured at."""
        return _interp(self.centroid_null, n)

    def psi_noise(self, n: int) -> float | None:
        """The confidence PSI that ``n`` in-distribution requests reach by chance (99th percentile)."""
        return _interp(self.psi_null, n)

    @classmethod
    def build(cls, predictor, texts: Sequence[str], agreement: float | None = None,
              source: str | None = None) -> "Reference":
        """The student's confidences and mean embedding on ``texts``: held-out inputs it never trained on."""
        texts = list(texts)
        conf = [p.confidence for p in predictor.predict(texts)] if texts else []
        emb = predictor.embed(texts) if texts else None
        have = emb is not None and len(emb) > 1
        return cls(conf, unit_mean(emb) if have else None, agreement, len(texts), source,
                   centroid_null(np.asarray(emb)) if have else None, psi_null(np.asarray(conf)) if len(conf) > 1 else None)

    def to_json(self) -> dict:
        return {"confidences": [round(float(x), 6) for x in self.confidences],
                "centroid": None if self.centroid is None else [float(x) for x in self.centroid],
                "agreement": self.agreement, "n_texts": self.n_texts, "source": self.source,
                "centroid_null": [[int(m), round(float(q), 6)] for m, q in self.centroid_null],
                "psi_null": [[int(m), round(float(q), 6)] for m, q in self.psi_null]}

    @classmethod
    def from_json(cls, d: dict) -> "Reference":
        c = d.get("centroid")
        return cls(d.get("confidences") or [], None if c is None else np.array(c), d.get("agreement"),
                   d.get("n_texts", 0), d.get("source"), d.get("centroid_null"), d.get("psi_null"))

    def save(self, path: Path) -> None:
        from protege.data import write_json

        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> "Reference | None":
        p = Path(path)
        return cls.from_json(json.loads(p.read_text(encoding="utf-8"))) if p.is_file() else None


NULL_SIZES = (25, 50, 100, 200, 400, 1000, 4000)


def psi_null(conf: np.ndarray, sizes: Sequence[int] = NULL_SIZES, draws: int = 200, seed: int = 0) -> list:
    """The PSI that in-distribution traffic reaches by chance against this reference: for each live size m,
    the 99th percentile of PSI between a resampled reference (its own size) and a resampled live window of m.
    A small gold set has a large chance PSI; the fixed 0.1 / 0.25 rules of thumb assume large samples."""
    rng = np.random.default_rng(seed)
    c = np.asarray(conf, dtype=float)
    n, bins = len(c), psi_bins(len(c))
    return [(m, float(np.quantile([psi(c[rng.integers(0, n, n)], c[rng.integers(0, n, m)], bins=bins)
                                   for _ in range(draws)], 0.99))) for m in sizes]


def centroid_null(emb: np.ndarray, sizes: Sequence[int] = NULL_SIZES, draws: int = 200, seed: int = 0) -> list:
    """How far apart the centroids of two in-distribution samples land by chance: for each live size m, the
    99th percentile of the cosine distance between the unit means of a resampled reference (its own size) and
    a resampled live window of m, both drawn from the held-out inputs. A student whose embeddings are spread
    out (or a small reference) has a large chance distance; a fixed threshold alone would cry wolf there."""
    rng = np.random.default_rng(seed)
    X = np.asarray(emb, dtype=np.float64)
    n = len(X)
    out = []
    for m in sizes:
        d = [cosine_distance(X[rng.integers(0, n, n)].mean(0), X[rng.integers(0, n, m)].mean(0)) for _ in range(draws)]
        out.append((m, float(np.quantile(d, 0.99))))
    return out


def snapshot(ref: Reference | None, confidences: Sequence[float], shadow: Sequence[int],
             centroid_distance: float | None = None, centroid_n: int | None = None) -> dict:
    """The drift figures for one window of traffic (JSON-able; NaN-free: unknown is None)."""
    conf = np.asarray(confidences, dtype=float)
    k, n = int(np.sum(shadow)), len(shadow)
    lo, hi = wilson(k, n)
    out = {"n": int(len(conf)), "mean_confidence": float(conf.mean()) if len(conf) else None,
           "psi": None, "centroid_distance": centroid_distance, "shadow_n": n,
           "centroid_noise": None if ref is None or centroid_distance is None else
           ref.centroid_noise(centroid_n if centroid_n is not None else len(conf)),
           "agreement": k / n if n else None, "agreement_ci": [lo, hi] if n else None,
           "reference_agreement": None if ref is None else ref.agreement,
           "reference_mean_confidence": None if ref is None or not len(ref.confidences) else float(ref.confidences.mean())}
    if ref is not None and len(ref.confidences) and len(conf):
        out["psi"] = psi(ref.confidences, conf, bins=psi_bins(len(ref.confidences)))
        out["psi_noise"] = ref.psi_noise(len(conf))
    return out


def assess(snap: dict, *, psi_alert: float = 0.25, centroid_alert: float = 0.15, agreement_drop: float = 0.05) -> dict:
    """``{"status": ok | watch | re-distill | not enough traffic, "reasons": [...]}`` for a snapshot."""
    reasons, watch, act = [], False, False
    enough = snap["n"] >= MIN_LIVE
    if enough and snap.get("psi") is not None:
        v, noise = snap["psi"], snap.get("psi_noise") or 0.0  # beyond what this window reaches by chance
        if v > max(psi_alert, noise):
            act = True
            reasons.append(f"confidence PSI {v:.3f} > {max(psi_alert, noise):.3f}: the student's inputs look unlike "
                           f"its held-out inputs")
        elif v > max(0.1, noise):
            watch = True
            reasons.append(f"confidence PSI {v:.3f}: moderate shift (> {max(0.1, noise):.3f})")
    if enough and snap.get("centroid_distance") is not None:
        v, noise = snap["centroid_distance"], snap.get("centroid_noise")
        alert = max(centroid_alert, noise or 0.0)  # beyond what this many in-distribution requests reach by chance
        if v > alert:
            act = True
            reasons.append(f"input centroid moved {v:.3f} (cosine) > {alert:.3f}: new kinds of input"
                           + (f" (chance level for this window: {noise:.3f})" if noise else ""))
        elif v > centroid_alert / 2 and v > (noise or 0.0):
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
        # running sum of every embedding this session observed: stored with each snapshot, so the distance
        # over any window of stored traffic can be recomputed later (see window_centroid_distance)
        self.session, self.emb_sum, self.emb_n = uuid.uuid4().hex[:12], None, 0

    def observe(self, confidence: float | None, embedding: np.ndarray | None = None) -> None:
        with self.lock:
            if confidence is not None:
                self.conf.append(float(confidence))
            if embedding is not None:
                e = np.asarray(embedding, dtype=np.float32)
                self.emb.append(e)
                self.emb_sum = e.astype(np.float64) if self.emb_sum is None else self.emb_sum + e
                self.emb_n += 1

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
            emb = None if self.emb_sum is None else {"session": self.session, "n": self.emb_n,
                                                     "sum": [float(x) for x in self.emb_sum]}
        out = snapshot(self.ref, conf, shadow, self.centroid_distance(), len(self.emb))
        out["embedding_sum"] = emb
        return out


def window_centroid(snapshots: Sequence[dict], window: int) -> tuple[np.ndarray | None, int]:
    """(unit mean embedding, n) of about the last ``window`` requests, from stored snapshots (oldest first).

    Each snapshot holds its session's running ``embedding_sum``; the difference between two snapshots of one
    session is the traffic between them, and a session's first snapshot covers everything before it. Whole
    steps (up to 100 requests between snapshots) are taken, newest first, until the window is covered.
    """
    steps, last = [], {}  # last: session -> (n, sum) of its latest snapshot so far
    for snap in snapshots:
        e = snap.get("embedding_sum")
        if not e:
            continue
        cur = np.asarray(e["sum"], dtype=np.float64)
        n0, s0 = last.get(e["session"], (0, 0.0))
        if e["n"] > n0:
            steps.append((e["n"] - n0, cur - s0))
        last[e["session"]] = (e["n"], cur)
    total, n = None, 0
    for k, v in reversed(steps):
        total, n = (v if total is None else total + v), n + k
        if n >= window:
            break
    return (None if total is None else unit_mean(total[None, :] / n)), n


def drift_report(store, ref: Reference | None, *, window: int = 1000, **thresholds) -> dict:
    """``protege drift``: the figures recomputed from the traffic store's last ``window`` requests."""
    last = store.latest_drift()
    dist = None
    if ref is not None and ref.centroid is not None:
        rows = store.query("SELECT snapshot FROM drift ORDER BY id DESC LIMIT ?", (window // 10 + 100,))
        live, n_live = window_centroid([json.loads(r[0]) for r in rows[::-1]], window)
        dist = None if live is None else cosine_distance(ref.centroid, live)
    snap = snapshot(ref, store.recent_confidences(window), store.recent_shadow(window), dist,
                    locals().get("n_live"))
    snap["counts"] = store.counts()
    snap["last_snapshot_ts"] = None if last is None else last["ts"]
    return {**snap, **assess(snap, **thresholds)}


def gold_reference(engine) -> Reference | None:
    """Student confidences (+ embedding centroid) on held-out inputs, cached per student version.

    The gold inputs: the student never trained on them, so in-distribution traffic looks like them (its
    own training inputs would not: it is more confident there, and every PSI would read as drift).
    """
    if engine.predictor is None or engine.run is None:
        return None
    agreement = ((engine.report or {}).get("student") or {}).get("agreement")
    sp = engine.student_path
    version = max((f.stat().st_mtime_ns for f in sp.iterdir()), default=0) if sp and sp.is_dir() else 0
    path = engine.data_dir / "reference.json"
    cached = (json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None)
    if cached and cached.get("student_version") == version and cached.get("source") == "gold":
        ref = Reference.from_json(cached)
        ref.agreement = agreement
        return ref
    from protege.data import load_gold, write_json

    try:
        rows = load_gold(engine.task)
    except (OSError, ValueError) as e:  # TaskError is a ValueError
        log.warning("no drift reference: the gold inputs could not be read (%s)", e)
        return None
    n = 32 if engine.predictor.is_lm else 1000
    texts = [r["text"] for r in random.Random(0).sample(rows, min(n, len(rows)))]
    ref = Reference.build(engine.predictor, texts, agreement, source="gold")
    write_json(path, {**ref.to_json(), "student_version": version})
    return ref

"""The gateway's decisions, without HTTP: who answers a request, and what is recorded about it.

``Engine.answer(text)``:

1. **capture mode** — the teacher answers (through the ledger), the answer and its label probabilities
   are recorded as new training data; the student, if there is one, is scored alongside for free
   agreement figures.
2. otherwise the **student** answers when its confidence ≥ the threshold (``serve.threshold``, else the risk gate
   certified for ``serve.risk`` / ``serve.delta`` on the out-of-fold calibration set
   (:mod:`protege.serve.conformal`), else ``evaluate``'s pick in ``report.json``, else
   ``serve.default_threshold``) and, with ``serve.ood_alpha``, the input is not unfamiliar; a ``shadow_fraction``
   of those answers is re-asked of the teacher in the background. With ``serve.levels`` the next student levels
   are tried in order, each behind its own gates (:mod:`protege.serve.gates`).
3. past every level the request **escalates**: to the teacher (through the ledger:
   :func:`protege.stages.generate.label_with_ledger`, so a repeated input is never paid twice and the answer is
   a cache hit when ``protege redistill`` labels the same input later), or into the human review queue
   (the student's answer is returned, marked provisional, with the review id). A teacher that fails or
   is over budget leaves the student's answer in place (``answered_by: student-fallback``).

Shadow checks go through a bounded queue (:class:`~protege.serve.background.BoundedPool`): when the
teacher cannot keep up, new checks are dropped and counted (``protege_shadow_dropped_total``), and
``close()`` drops the backlog rather than working it off. With ``escalate: none`` shadow checks are off
unless ``shadow_fraction`` is set explicitly: "none" means the gateway does not call the teacher (a local
teacher would otherwise be loaded into the gateway for a 5% sample).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from protege import progress
from protege.kinds import kind_of
from protege.task import ServeConfig, TaskSpec
from protege.serve.background import BoundedPool
from protege.serve.drift import DriftMonitor, gold_reference
from protege.serve.gates import Level, build_levels, level_folder, make_ood, next_level, served_threshold
from protege.serve.predictor import Prediction, load_predictor
from protege.serve.store import TrafficStore

log = logging.getLogger("protege.serve")
SNAPSHOT_EVERY = 100  # requests between drift snapshots written to the store


class TeacherUnavailable(RuntimeError):
    """Capture mode without a student, and the teacher did not answer."""


@dataclass
class GatewayConfig:
    """Everything ``create_app`` needs. ``run`` is the run folder (student, report.json, ledger)."""

    task: TaskSpec
    run: Path | None = None
    student: Path | None = None  # default <run>/train/student; an ONNX export folder works too
    serve: ServeConfig | None = None  # default task.serve
    teacher: object | None = None  # a Teacher instance; default make_teacher(task), built on first use
    api_keys: list[str] | None = None  # default: the env var serve.api_keys_env names
    data_dir: Path | None = None  # traffic.sqlite, reference.json; default <run>/serve
    predictor: object | None = None  # an already loaded predictor (benchmarks, embedding)
    quiet: bool = True  # no progress bar per escalated request; scoped to the engine's calls, not the process
    read_timeout_s: float = 30.0  # a request body not fully received this long after its headers: 408
    shadow_queue: int = 256  # shadow checks waiting for the teacher; beyond, new ones are dropped (and counted)
    infer_workers: int = 2  # threads that run big batches off the event loop
    infer_process: bool = True  # big classify batches in a worker process (a student loaded from a folder)

    @property
    def settings(self) -> ServeConfig:
        return self.serve or self.task.serve

    def keys(self) -> list[str]:
        if self.api_keys is not None:
            return [k for k in self.api_keys if k]
        env = self.settings.api_keys_env
        return [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()] if env else []


@dataclass
class Outcome:
    content: str
    label: str | None
    answered_by: str  # student | teacher | review | student-fallback
    confidence: float | None  # of the answer given
    student_confidence: float | None = None
    probs: dict[str, float] | None = None
    review_id: int | None = None
    threshold: float | None = None
    tokens: list = field(default_factory=list)
    prompt_tokens: int = 0
    teacher_usd: float = 0.0
    student_label: str | None = None
    teacher_label: str | None = None
    teacher_probs: list[float] | None = None
    teacher_soft: str | None = None
    error: str | None = None
    level: str | None = None  # which level answered: a student level's name, "teacher" or "review"
    ood_distance: float | None = None

    def info(self) -> dict:
        return {"answered_by": self.answered_by, "level": self.level or self.answered_by,
                "confidence": self.confidence, "student_confidence": self.student_confidence,
                "threshold": self.threshold, **({"review_id": self.review_id} if self.review_id is not None else {}),
                **({"ood_distance": self.ood_distance} if self.ood_distance is not None else {})}


def _read_json(p: Path) -> dict | None:
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


class Engine:
    def __init__(self, cfg: GatewayConfig):
        self.cfg, self.task, self.s = cfg, cfg.task, cfg.settings
        self.run = Path(cfg.run) if cfg.run else None
        self.data_dir = Path(cfg.data_dir) if cfg.data_dir else (self.run or Path("runs") / self.task.name) / "serve"
        self.report = _read_json(self.run / "report.json") if self.run else None
        self.model_name = self.s.model_name or self.task.name
        self.threshold, self.threshold_source, self.risk_gate = served_threshold(self.run, self.s, self.report)
        self.student_path = Path(cfg.student) if cfg.student else (self.run / "train" / "student" if self.run else None)
        self.predictor = cfg.predictor
        if self.predictor is None and self.student_path is not None and (
                (self.student_path / "config.json").is_file() or (self.student_path / "model.onnx").is_file()):
            self.predictor = load_predictor(self.student_path, self.model_name, self.s.max_tokens)
        self.levels = build_levels(self.task, self.run, self.s, self.model_name, self.s.max_tokens) if self.s.levels else []
        if self.levels:  # the first level is the gateway's student: drift, batching and workers all use it
            self.predictor, self.student_path = self.levels[0].predictor, level_folder(self.run, self.s.levels[0])
            self.threshold, self.threshold_source = self.levels[0].threshold, self.levels[0].source
            self.risk_gate = self.levels[0].gate
        self.ood = self.levels[0].ood if self.levels else make_ood(self.run, self.predictor, self.s.ood_alpha)
        if self.predictor is None and not self.s.capture:
            raise FileNotFoundError(f"no trained student at {self.student_path}; run `protege train` first, or serve in "
                                    f"capture mode (serve.capture: true / --capture) to collect data with the teacher")
        self.store = TrafficStore(self.data_dir / "traffic.sqlite")
        self.ledger_path = (self.run or self.data_dir) / "ledger.sqlite"
        self._teacher, self._teacher_lock, self._tl = cfg.teacher, threading.Lock(), threading.local()
        self._ledgers: list = []
        self.reference = gold_reference(self)
        self.monitor = DriftMonitor(self.reference, self.s.drift_window)
        explicit = "shadow_fraction" in self.s.model_fields_set
        self.shadow_fraction = 0.0 if self.s.escalate == "none" and not explicit else float(self.s.shadow_fraction)
        self.shadow = BoundedPool(2, cfg.shadow_queue, "protege-shadow", on_drop=self._shadow_dropped)
        self.shadow_pool = self.shadow  # the old name: shutdown(wait=True) still works off the queue
        self.infer_pool = ThreadPoolExecutor(max_workers=cfg.infer_workers, thread_name_prefix="protege-infer")
        self._infer_proc, self._infer_proc_lock = None, threading.Lock()
        self.rng = random.Random()
        cost = (self.report or {}).get("cost") or {}
        self.teacher_usd_per_call = cost.get("teacher_usd_per_call")
        self.student_usd_per_call = cost.get("student_usd_per_call") or 0.0
        self._count_lock, self._since_snapshot = threading.Lock(), 0
        self.metrics = None  # set by the app (prometheus); events below are no-ops without it

    # -- setup -------------------------------------------------------------------------------

    def teacher(self):
        with self._teacher_lock:
            if self._teacher is None:
                from protege.registry import make_teacher
                from protege.teachers.textgen import text_teacher

                # extract / generate: the teacher answers in text (as in `protege generate`), not with a label
                self._teacher = make_teacher(self.task) if kind_of(self.task).labelled else text_teacher(self.task)
            return self._teacher

    def _ledger(self):
        led = getattr(self._tl, "ledger", None)
        if led is None:
            from protege.teachers.ledger import Ledger

            led = self._tl.ledger = Ledger(self.ledger_path)
            with self._count_lock:
                self._ledgers.append(led)
        return led

    # -- the teacher -------------------------------------------------------------------------
    def ask_teacher(self, text: str, stage: str):
        """(Answer, $) through the ledger; errors come back as an Answer with status 'error'."""
        from protege.stages.generate import label_with_ledger
        from protege.teachers.ledger import BudgetExceeded
        from protege.teachers.base import Answer

        budget = self.s.budget_usd if self.s.budget_usd is not None else self.task.teacher.budget_usd
        try:
            teacher = self.teacher()
            # a local model's cached prompt prefix is not thread-safe
            lock = self._teacher_lock if getattr(teacher, "local", False) else contextlib.nullcontext()
            with lock, progress.quiet(self.cfg.quiet):
                answers, stats = label_with_ledger(teacher, [text], self._ledger(), stage=stage, budget_usd=budget)
        except BudgetExceeded as e:
            return Answer(label=None, status="error", error=f"teacher budget: {e}"), 0.0
        except Exception as e:  # a teacher that cannot be built or reached must not take the gateway down
            return Answer(label=None, status="error", error=f"{type(e).__name__}: {e}"), 0.0
        usd = float(stats["usd"])
        if self.metrics is not None and usd:
            self.metrics.teacher_usd.inc(usd)
        return answers[0][0], usd

    def _teacher_outcome(self, ans, usd: float, base: Outcome | None) -> Outcome:
        probs = dict(zip(self.task.labels, ans.probs)) if ans.probs else None
        content = ans.label if ans.label is not None else ans.text
        return Outcome(content, ans.label, "teacher", max(ans.probs) if ans.probs else None,
                       base.student_confidence if base else None, probs, threshold=self.threshold, teacher_usd=usd,
                       student_label=base.student_label if base else None, teacher_label=ans.label,
                       teacher_probs=ans.probs, teacher_soft=ans.soft, level="teacher")

    # -- answering ---------------------------------------------------------------------------
    def predict(self, texts: list[str], **lm) -> list[Prediction]:
        return self.predictor.predict(texts, **lm) if self.predictor.is_lm else self.predictor.predict(texts)

    def answer(self, text: str, endpoint: str, **lm) -> Outcome:
        return self.answer_many([text], endpoint, **lm)[0]

    @property
    def infer_proc(self):
        """The worker process for big classify batches (started on the first one), or None: an LM student, or a
        predictor object handed in rather than a student folder."""
        if not (self.cfg.infer_process and self.cfg.predictor is None and self.predictor is not None
                and not self.predictor.is_lm):
            return None
        with self._infer_proc_lock:
            if self._infer_proc is None:
                from protege.serve.workers import InferenceProcess

                self._infer_proc = InferenceProcess(self.student_path, self.model_name)
        return self._infer_proc

    def wants_embedding(self) -> bool:
        return (self.reference is not None and self.reference.centroid is not None) or self.ood is not None

    def answer_many(self, texts: list[str], endpoint: str, preds: list[Prediction] | None = None, embs=None,
                    **lm) -> list[Outcome]:
        t0 = time.perf_counter()
        if self.s.capture:
            outs = [self._capture(t, lm) for t in texts]
        else:
            preds = preds if preds is not None else self.predict(texts, **lm)
            if embs is None and self.wants_embedding() and not self.predictor.is_lm:
                embs = self.predictor.embed(texts)  # one batched call, not one per input
            outs = [self.route(t, p, None if embs is None else embs[i]) for i, (t, p) in enumerate(zip(texts, preds))]
        ms = (time.perf_counter() - t0) * 1000 / max(1, len(texts))
        for t, o in zip(texts, outs):
            self.record(endpoint, t, o, ms)
        return outs

    def student_outcome(self, p: Prediction) -> Outcome:
        return Outcome(p.content, p.label, "student", p.confidence, p.confidence, p.probs, threshold=self.threshold,
                       tokens=p.tokens, prompt_tokens=p.prompt_tokens, student_label=p.label,
                       level=self.levels[0].name if self.levels else "student")

    def route(self, text: str, p: Prediction, emb=None) -> Outcome:
        if emb is None and self.wants_embedding():
            e = self.predictor.embed([text])
            emb = None if e is None else e[0]
        self.monitor.observe(p.confidence, emb)
        base = self.student_outcome(p)
        first = self.levels[0] if self.levels else Level("student", self.predictor, self.threshold, "", None, self.ood)
        ok, base.ood_distance = first.passes(p.confidence, text, emb)
        if ok or self.s.escalate == "none":
            if self.shadow_fraction and self.rng.random() < self.shadow_fraction:
                self.shadow.submit(self._shadow, text, p)
            return base
        nxt = next_level(self.levels[1:], text)  # the next student levels, each behind its own gates
        if nxt is not None:
            lv, q, dist = nxt
            return Outcome(q.content, q.label, "student", q.confidence, p.confidence, q.probs, threshold=lv.threshold,
                           student_label=q.label, level=lv.name, ood_distance=dist)
        if self.s.escalate == "review":
            base.answered_by = base.level = "review"
            base.review_id = self.store.enqueue_review(text, p.label, p.confidence)
            return base
        ans, usd = self.ask_teacher(text, "serve")
        if ans.status == "ok" and (ans.label is not None or ans.text):
            return self._teacher_outcome(ans, usd, base)
        log.warning("teacher unavailable, the student answers: %s", ans.error)
        base.answered_by, base.error = "student-fallback", ans.error
        return base

    def _capture(self, text: str, lm: dict) -> Outcome:
        p = None
        if self.predictor is not None and not self.predictor.is_lm:
            p = self.predictor.predict([text])[0]  # free: a classifier costs microseconds
            self.monitor.observe(p.confidence)
        ans, usd = self.ask_teacher(text, "capture")
        if ans.status == "ok":
            out = self._teacher_outcome(ans, usd, self.student_outcome(p) if p else None)
            if p is not None and ans.label is not None:
                self._shadow_row(text, p, ans)
            return out
        if p is None:
            raise TeacherUnavailable(f"capture mode: the teacher did not answer ({ans.error})")
        out = self.student_outcome(p)
        out.answered_by, out.error = "student-fallback", ans.error
        return out

    def _shadow_dropped(self) -> None:
        if self.metrics is not None:
            self.metrics.shadow_dropped.inc()

    def _shadow(self, text: str, p: Prediction) -> None:
        try:
            ans, _ = self.ask_teacher(text, "shadow")
            if ans.status != "ok" or ans.label is None:
                if self.metrics is not None:
                    self.metrics.shadow.labels("error").inc()
                return
            self._shadow_row(text, p, ans)
        except Exception:  # background work: log, never raise into the pool
            log.exception("shadow check failed")

    def _shadow_row(self, text: str, p: Prediction, ans) -> None:
        agree = ans.label == p.label
        self.monitor.observe_shadow(agree)
        self.store.add("shadow", text=text, student_label=p.label, student_confidence=p.confidence,
                       teacher_label=ans.label, teacher_probs=ans.probs, agree=int(agree))
        if self.metrics is not None:
            self.metrics.shadow.labels("agree" if agree else "disagree").inc()

    # -- bookkeeping -------------------------------------------------------------------------
    def record(self, endpoint: str, text: str, o: Outcome, ms: float) -> None:
        capture = self.s.capture
        keep_text = capture or o.answered_by != "student"  # what left the student is what redistill learns from
        self.store.add("requests", endpoint=endpoint, mode="capture" if capture else "cascade",
                       answered_by=o.answered_by, label=o.label, confidence=o.student_confidence,
                       threshold=o.threshold, student_label=o.student_label, teacher_label=o.teacher_label,
                       teacher_probs=o.teacher_probs, teacher_soft=o.teacher_soft, teacher_usd=o.teacher_usd,
                       review_id=o.review_id, latency_ms=ms, text=text if keep_text else None)
        if self.metrics is not None:
            self.metrics.observe(endpoint, o, ms / 1000)
        with self._count_lock:
            self._since_snapshot += 1
            due = self._since_snapshot >= SNAPSHOT_EVERY
            if due:
                self._since_snapshot = 0
        if due:
            self.write_snapshot()

    def write_snapshot(self) -> dict:
        snap = self.monitor.snapshot()
        self.store.add("drift", snapshot=json.dumps(snap))
        return snap

    def usd_saved_per_student_answer(self) -> float | None:
        if self.teacher_usd_per_call is None:
            return None
        return max(0.0, float(self.teacher_usd_per_call) - float(self.student_usd_per_call))

    def close(self, timeout_s: float = 3.0) -> None:
        """Stop in bounded time: queued shadow checks are dropped, running ones get ``timeout_s``."""
        self.infer_pool.shutdown(wait=False, cancel_futures=True)
        if self._infer_proc is not None:
            self._infer_proc.close()
        self.shadow.shutdown(wait=True, cancel_pending=True, timeout=timeout_s)
        if self.monitor.conf:
            self.write_snapshot()
        self.store.flush()
        self.store.close()
        for led in self._ledgers:
            try:
                led.close()
            except Exception:
                pass
        if self._teacher is not None and self.cfg.teacher is None:
            self._teacher.close()

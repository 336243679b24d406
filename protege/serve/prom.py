"""``/metrics`` in the Prometheus text format: traffic, escalations, latency, money, drift.

One registry per app (not the process-global one), so two gateways in one process — or a test suite —
never share counters. Drift gauges are recomputed from the live windows at scrape time.
"""

from __future__ import annotations

BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _num(v) -> float:
    return float("nan") if v is None else float(v)


class Metrics:
    def __init__(self, engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # the *_created series double the output and nobody graphs them
        self.engine = engine
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("protege_requests", "Inputs answered, by endpoint and by who answered them",
                                ["endpoint", "answered_by"], registry=r)
        self.levels = Counter("protege_answers_by_level", "Inputs answered, by the cascade level that answered them "
                              "(a student level's name, teacher, review)", ["level"], registry=r)
        self.escalations = Counter("protege_escalations", "Inputs the student was unsure about, by where they went",
                                   ["to"], registry=r)
        self.rejected = Counter("protege_rejected_requests", "Requests refused before any model ran "
                                "(auth, rate, size, invalid)", ["reason"], registry=r)
        self.latency = Histogram("protege_request_latency_seconds", "Time to answer one input, by who answered it",
                                 ["answered_by"], buckets=BUCKETS, registry=r)
        self.teacher_usd = Counter("protege_teacher_usd", "Dollars spent on teacher calls by this gateway", registry=r)
        self.saved_usd = Counter("protege_saved_usd", "Dollars saved vs sending every input to the teacher "
                                 "(student answers x (teacher - student) $ per call, from report.json)", registry=r)
        self.shadow = Counter("protege_shadow_checks", "Background teacher checks of student answers, by result",
                              ["result"], registry=r)
        self.shadow_dropped = Counter("protege_shadow_dropped", "Shadow checks dropped because the queue to the "
                                      "teacher was full (or the gateway was stopping)", registry=r)
        self.g_threshold = Gauge("protege_cascade_threshold", "Student confidence needed to answer without the "
                                 "teacher", registry=r)
        self.g_agreement = Gauge("protege_shadow_agreement", "Live student-teacher agreement on shadow checks "
                                 "(recent window)", registry=r)
        self.g_ref_agreement = Gauge("protege_reference_agreement", "Student-teacher agreement measured by evaluate",
                                     registry=r)
        self.g_psi = Gauge("protege_drift_confidence_psi", "PSI of recent student confidences vs the training inputs",
                           registry=r)
        self.g_centroid = Gauge("protege_drift_centroid_distance", "Cosine distance of recent vs training input "
                                "embedding centroids", registry=r)
        self.g_redistill = Gauge("protege_drift_redistill", "1 when the drift figures say: re-distill", registry=r)
        self.g_review = Gauge("protege_review_pending", "Items waiting in the human review queue", registry=r)
        self.g_threshold.set(engine.threshold)
        self.saved_per_answer = engine.usd_saved_per_student_answer()

    def observe(self, endpoint: str, outcome, seconds: float) -> None:
        who = outcome.answered_by
        self.requests.labels(endpoint, who).inc()
        self.levels.labels(outcome.level or who).inc()
        self.latency.labels(who).observe(seconds)
        if who in ("teacher", "review") and not self.engine.s.capture:
            self.escalations.labels(who).inc()
        if who == "student" and self.saved_per_answer:
            self.saved_usd.inc(self.saved_per_answer)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        from protege.serve.drift import assess

        e = self.engine
        snap = e.monitor.snapshot()
        self.g_agreement.set(_num(snap["agreement"]))
        self.g_ref_agreement.set(_num(snap["reference_agreement"]))
        self.g_psi.set(_num(snap["psi"]))
        self.g_centroid.set(_num(snap["centroid_distance"]))
        verdict = assess(snap, psi_alert=e.s.psi_alert, centroid_alert=e.s.centroid_alert,
                         agreement_drop=e.s.agreement_drop)
        self.g_redistill.set(1.0 if verdict["status"] == "re-distill" else 0.0)
        self.g_review.set(e.store.pending_reviews())
        return generate_latest(self.registry)

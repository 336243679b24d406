"""A causal-LM student on a fast runtime, checked against its reference: the same greedy answers?

The fast path (onnxruntime-genai or CTranslate2, float32 by default, schema-constrained for flat string schemas) is only worth its
speed if it answers what the trained model answers. On ``evaluate.reference_items`` gold items the student
also decodes through transformers' ``generate`` (float32, unconstrained: the model as trained); the report
gives the share of items with the same answer (extract: same fields and values), both single-item
latencies measured in this run, and the tokens decoded per answer.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from protege import metrics as M
from protege.kinds import Kind
from protege.timing import time_each


def runtime_report(student, kind: Kind, texts: Sequence[str], fast_out: Sequence[dict], *, n_ref: int | None,
                   n_single: int) -> dict:
    """The ``student.runtime`` block of report.json (``{"name": "transformers"}`` when no fast path is attached)."""
    fast = getattr(student, "fast", None)
    decoded = [d.get("decoded_tokens", len(d.get("token_ids") or [])) for d in fast_out]
    out = {"name": "transformers" if fast is None else fast.name,
           "constrained_fields": getattr(student, "fields", None) if fast is not None else None,
           "decoded_tokens_per_answer": float(np.mean(decoded)) if decoded else None}
    answer = [d["answer_tokens"] for d in fast_out if d.get("answer_tokens") is not None]
    if answer:
        out["answer_tokens_per_answer"] = float(np.mean(answer))
    if fast is None:
        return out
    n = len(texts) if n_ref is None else min(n_ref, len(texts))
    ref = student.generate(list(texts[:n]), batch_size=1, reference=True,
                           description="student reference (transformers): gold inputs")
    same = np.array([kind.same_answer(f["text"], r["text"]) for f, r in zip(fast_out[:n], ref)], dtype=float)
    out.update(reference="transformers float32, unconstrained", n_reference=n,
               same_answer_as_reference=float(same.mean()) if n else None,
               same_answer_ci=list(M.bootstrap_ci(same)) if n else None,
               different_items=[i for i, x in enumerate(same) if not x][:20])
    k = texts[: max(1, n_single)]
    student.generate(k[:1], batch_size=1, reference=True)  # warm-up
    ref_lat = M.latency_summary(time_each(k, lambda t: student.generate([t], batch_size=1, reference=True)))
    out["reference_latency"] = ref_lat
    return out

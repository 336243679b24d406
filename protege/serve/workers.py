"""A separate process for big classify batches, so the gateway's event loop never waits on the GIL.

A thread pool moves a 1,024-input batch off the event loop, but tokenising and featurising it is Python
work that holds the GIL in slices: on a busy 2-core box ``/healthz`` waited ~100 ms at the 99th percentile
behind it. In a worker process the batch costs the gateway process only the pickling of texts in and
predictions out. The worker loads the same student folder the gateway serves (a classifier, or an ONNX
export); one worker, started with the gateway, its torch / BLAS threads pinned to one.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np

_PREDICTOR = None


def _init(path: str, name: str) -> None:
    global _PREDICTOR
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gateway decides when its worker stops
    from protege.serve.predictor import load_predictor

    _PREDICTOR = load_predictor(path, name)


def _predict(texts: list[str], embed: bool):
    """Two float32 arrays back (probabilities, embeddings): cheap to unpickle, unlike a list of objects."""
    P = np.asarray(_PREDICTOR.student.predict_proba(texts), dtype=np.float32)
    E = _PREDICTOR.embed(texts) if embed else None
    return P, (None if E is None else np.asarray(E, dtype=np.float32))


def _ready() -> bool:
    return _PREDICTOR is not None


class InferenceProcess:
    """``submit(texts, embed) -> Future[(probabilities, embeddings | None)]`` answered by a worker process."""

    def __init__(self, student: str | Path, name: str):
        self.pool = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"), initializer=_init,
                                        initargs=(str(student), name))
        self.warm = self.pool.submit(_ready)  # load the student now, not on the first big batch

    def submit(self, texts: list[str], embed: bool) -> Future:
        return self.pool.submit(_predict, texts, embed)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

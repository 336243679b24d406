"""One way to time a model: single-item calls (what a server sees) and batched throughput."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence


def time_each(items: Sequence, call: Callable[[object], object]) -> list[float]:
    """Wall seconds of ``call(item)`` for each item, one at a time (what a server answering single requests
    sees). Warm-up is the caller's."""
    out = []
    for item in items:
        t0 = time.perf_counter()
        call(item)
        out.append(time.perf_counter() - t0)
    return out


def measure(fn: Callable[[list[str]], object], texts: Sequence[str], n_single: int = 100,
            repeats: int = 3, warmup: int = 2) -> tuple[list[float], float]:
    """(seconds of each single-item call over up to ``n_single`` inputs, median batched seconds per item).

    A warm-up call first (caches, lazy allocations); batched time is the median of ``repeats`` passes
    over all ``texts`` so one scheduler hiccup does not decide the figure.
    """
    texts = list(texts) or [""]
    fn(texts[:warmup])
    single = time_each(texts[:n_single], lambda t: fn([t]))
    runs = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn(texts)
        runs.append((time.perf_counter() - t0) / len(texts))
    return single, statistics.median(runs)

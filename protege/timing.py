"""One way to time a model: single-item calls (what a server sees) and batched throughput."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence


def measure(fn: Callable[[list[str]], object], texts: Sequence[str], n_single: int = 100,
            repeats: int = 3, warmup: int = 2) -> tuple[list[float], float]:
    """(seconds of each single-item call over up to ``n_single`` inputs, median batched seconds per item).

    A warm-up call first (caches, lazy allocations); batched time is the median of ``repeats`` passes
    over all ``texts`` so one scheduler hiccup does not decide the figure.
    """
    texts = list(texts) or [""]
    fn(texts[:warmup])
    single = []
    for t in texts[:n_single]:
        t0 = time.perf_counter()
        fn([t])
        single.append(time.perf_counter() - t0)
    runs = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn(texts)
        runs.append((time.perf_counter() - t0) / len(texts))
    return single, statistics.median(runs)

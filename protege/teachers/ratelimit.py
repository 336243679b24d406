"""Client-side rate limits and retry timing for API teachers.

Providers meter an account in requests per minute (RPM) and tokens per minute (TPM). Staying under
both on the client side is cheaper than being told to slow down: a 429 costs a round trip and, with
many workers, a thundering herd. :class:`RateLimiter` holds one token bucket per limit (capacity one
second's worth, so a fresh run does not burst a minute's quota into the first second) and a shared
*pause*: when the server says ``Retry-After``, every worker waits, not only the one that was told.

:func:`backoff_delay` is exponential backoff with jitter (cf. "full jitter", AWS architecture blog,
2015, with a floor of ``base``): the n-th retry waits a uniform random time in ``[base, base * 2**n]``
capped at ``cap``. A server's ``Retry-After`` (seconds, an HTTP date, or ``retry-after-ms``) replaces
that: its figure plus up to ``base`` of jitter.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from typing import Callable, Mapping


class TokenBucket:
    """``rate`` units per second, at most ``capacity`` banked. Async; single event loop."""

    def __init__(self, rate_per_s: float, capacity: float, clock: Callable[[], float] = time.monotonic):
        if rate_per_s <= 0:
            raise ValueError("rate must be positive")
        self.rate, self.capacity, self.clock = rate_per_s, max(1.0, capacity), clock
        self.level, self.t = self.capacity, clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now

    async def take(self, n: float = 1.0) -> float:
        """Wait until ``n`` units are available and take them; returns the seconds waited.

        A request larger than the bucket (one huge prompt) waits for a full bucket and drives the
        level negative, so it is delayed rather than refused forever.
        """
        waited = 0.0
        async with self._lock:  # FIFO: a big request is not starved by a stream of small ones
            while True:
                self._refill()
                need = min(n, self.capacity)
                if self.level >= need:
                    self.level -= n
                    return waited
                dt = (need - self.level) / self.rate
                waited += dt
                await asyncio.sleep(dt)


class RateLimiter:
    """Requests/min and tokens/min limits plus a shared pause after a 429."""

    def __init__(self, rpm: float | None = None, tpm: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.requests = TokenBucket(rpm / 60.0, rpm / 60.0, clock) if rpm else None
        self.tokens = TokenBucket(tpm / 60.0, tpm / 60.0, clock) if tpm else None
        self.paused_until = 0.0

    def pause(self, seconds: float) -> None:
        """Hold every worker for ``seconds`` (the server's Retry-After)."""
        self.paused_until = max(self.paused_until, self.clock() + seconds)

    async def acquire(self, tokens: int = 0) -> float:
        """Wait for the pause, a request slot and ``tokens`` tokens; returns the seconds waited."""
        waited = 0.0
        while (dt := self.paused_until - self.clock()) > 0:
            waited += dt
            await asyncio.sleep(dt)
        if self.requests is not None:
            waited += await self.requests.take(1)
        if self.tokens is not None and tokens > 0:
            waited += await self.tokens.take(tokens)
        return waited


def retry_after_s(headers: Mapping[str, str] | None) -> float | None:
    """Seconds the server asked us to wait: ``retry-after-ms``, ``Retry-After`` (seconds or HTTP date)."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(ra)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None = None,
                  rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): full jitter, Retry-After as a floor."""
    r = rng or random
    if retry_after is not None:
        # the server's figure, plus a little jitter so the workers it paused do not return in lockstep
        return retry_after + r.uniform(0, min(base, cap))
    hi = min(cap, base * (2 ** attempt))
    return r.uniform(min(base, hi), hi)

"""Send the teacher calls a stage needs: through the ledger, under the budget, with a progress bar.

:func:`protege.stages.generate.label_with_ledger` decides *what* to send (requests the ledger cannot answer);
this module sends it:

* **Async teachers** (API backends with ``acall``) run as a pipeline of ``teacher.concurrency``
  workers on the teacher's event loop: a new call starts the moment one finishes (no batch waits for
  its slowest call), and each answer is committed to the ledger as it arrives.
* **Batch teachers** (local models with ``answer(batch)``) are sent in batches.

**Budget.** Before each call is sent its cost and tokens are estimated (upper bounds: prompt size at
the smallest chars-per-token seen, plus ``max_tokens``) and *reserved*: a call goes out only if spent
+ reserved-by-calls-in-flight + its estimate stays within ``budget_usd`` / ``budget_tokens``. When a
call does not fit, the pipeline waits for calls in flight (their actual cost is often below the
estimate); when nothing is in flight and it still does not fit, the run stops. Re-asks are reserved
the same way. A stopped run has committed every answer it received.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Callable

from protege.teachers.ledger import Ledger
from protege.teachers.base import Answer, Teacher


class BudgetGate:
    """Spent + reserved (in flight) against the caps. Single-threaded use (one event loop or one thread)."""

    def __init__(self, ledger: Ledger, budget_usd: float | None, budget_tokens: int | None):
        self.usd_cap, self.tok_cap = budget_usd, budget_tokens
        self.spent = ledger.spent()
        self.tokens = ledger.tokens_used() if budget_tokens is not None else 0
        self.res_usd, self.res_tok = 0.0, 0

    def fits(self, usd: float, tokens: int) -> bool:
        if self.usd_cap is not None and self.spent + self.res_usd + usd > self.usd_cap + 1e-12:
            return False
        if self.tok_cap is not None and self.tokens + self.res_tok + tokens > self.tok_cap:
            return False
        return True

    def reserve(self, usd: float, tokens: int) -> bool:
        if not self.fits(usd, tokens):
            return False
        self.res_usd += usd
        self.res_tok += tokens
        return True

    def release(self, usd: float, tokens: int) -> None:
        self.res_usd = max(0.0, self.res_usd - usd)
        self.res_tok = max(0, self.res_tok - tokens)

    def charge(self, ans: Answer) -> None:
        self.spent += ans.cost_usd
        self.tokens += ans.tokens_in + ans.tokens_out

    def refusal(self, usd: float, tokens: int) -> str:
        if self.usd_cap is not None and self.spent + usd > self.usd_cap + 1e-12:
            return f"budget ${self.usd_cap:.4f} reached: spent ${self.spent:.4f}, next call ~${usd:.4f}"
        return f"token budget {self.tok_cap:,} reached: used {self.tokens:,}, next call ~{tokens:,} tokens"


def _estimate(teacher: Teacher, req: dict) -> tuple[float, int]:
    est_tok = getattr(teacher, "estimate_tokens", None)
    return teacher.estimate_cost(req), (int(est_tok(req)) if est_tok else 0)


OnAnswer = Callable[[int, int, dict, Answer], None]


def send_batched(teacher: Teacher, texts: list[str], todo: list[tuple[int, int]], gate: BudgetGate,
                 on_answer: OnAnswer, batch_size: int) -> str | None:
    """Batches of up to ``batch_size``, each cut to what the budget allows. Returns a stop reason or None."""
    pos = 0
    while pos < len(todo):
        chunk = todo[pos : pos + batch_size]
        reqs = [teacher.request(texts[i], s) for i, s in chunk]
        ests = [_estimate(teacher, r) for r in reqs]
        k = 0
        while k < len(chunk) and gate.reserve(*ests[k]):
            k += 1
        if k == 0:
            return gate.refusal(*ests[0])
        answers = teacher.answer(reqs[:k])
        for (i, s), req, est, ans in zip(chunk, reqs, ests, answers):
            gate.release(*est)
            gate.charge(ans)
            on_answer(i, s, req, ans)
        pos += k
    return None


def send_async(teacher, texts: list[str], todo: list[tuple[int, int]], gate: BudgetGate, on_answer: OnAnswer,
               concurrency: int) -> str | None:
    """``concurrency`` workers on the teacher's event loop. Returns a stop reason or None."""
    return teacher.run(_pipeline(teacher, texts, todo, gate, on_answer, concurrency))


async def _pipeline(teacher, texts, todo, gate: BudgetGate, on_answer: OnAnswer, concurrency: int) -> str | None:
    it = iter(todo)
    cond = asyncio.Condition()
    st: dict = {"inflight": 0, "stop": None}

    async def worker() -> None:
        while st["stop"] is None:
            try:
                i, s = next(it)
            except StopIteration:
                return
            req = teacher.request(texts[i], s)
            est = _estimate(teacher, req)
            async with cond:
                while not gate.reserve(*est):
                    if st["inflight"] == 0 or st["stop"] is not None:  # nothing will free budget: stop here
                        st["stop"] = st["stop"] or gate.refusal(*est)
                        cond.notify_all()
                        return
                    await cond.wait()
                st["inflight"] += 1
            held = list(est)

            def more(usd: float, tokens: int) -> bool:  # a re-ask is a new paid call: reserve it too
                if gate.reserve(usd, tokens):
                    held[0] += usd
                    held[1] += tokens
                    return True
                return False

            try:
                ans = await teacher.acall(req, reserve=more)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug must not lose the item: record it as failed, retried next run
                ans = Answer(label=None, status="error", error=f"{type(e).__name__}: {e}",
                             extra={"reason": "client_error", "requests": 1})
            gate.release(*held)
            gate.charge(ans)
            on_answer(i, s, req, ans)
            async with cond:
                st["inflight"] -= 1
                cond.notify_all()

    workers = [asyncio.create_task(worker()) for _ in range(max(1, min(concurrency, len(todo))))]
    try:
        await asyncio.gather(*workers)
    except BaseException:
        for w in workers:
            w.cancel()
        raise
    return st["stop"]


class Tally:
    """Counts for stats and the progress bar: items done, calls, failures by reason, $, calls/s."""

    def __init__(self, n_items: int, samples: int, todo: list[tuple[int, int]], cache_hits: int, gate: BudgetGate,
                 advance: Callable[..., None]):
        self.n, self.samples, self.gate, self.advance = n_items, samples, gate, advance
        self.left = Counter(i for i, _ in todo)
        self.items_done = n_items - len(self.left)
        self.cache_hits, self.calls, self.failed, self.usd = cache_hits, 0, 0, 0.0
        self.failures: Counter = Counter()
        self.t0 = time.perf_counter()
        self._last = 0.0

    def fields(self) -> dict:
        rate = self.calls / max(1e-9, time.perf_counter() - self.t0)
        f = {"items": f"{self.items_done}/{self.n}", "cached": self.cache_hits, "calls/s": f"{rate:.1f}"}
        if self.failed:
            f["failed"] = self.failed
        cap = self.gate.usd_cap
        f["$"] = f"{self.gate.spent:.4f}" + (f"/{cap:.2f}" if cap is not None else "")
        if self.gate.tok_cap is not None:
            f["tokens"] = f"{self.gate.tokens:,}/{self.gate.tok_cap:,}"
        return f

    def add(self, i: int, ans: Answer) -> None:
        self.calls += 1
        self.usd += ans.cost_usd
        if ans.status != "ok":
            self.failed += 1
            self.failures[(ans.extra or {}).get("reason") or "error"] += 1
        self.left[i] -= 1
        if self.left[i] == 0:
            self.items_done += 1
        self.advance(1, **self.fields())

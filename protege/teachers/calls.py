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
the same way. A stopped run has committed every answer it received. One request whose estimate alone
is more than the whole budget is not sent at all: that item fails with ``reason="over_budget"`` (it is
retried on a later run, e.g. with a larger budget) and the others go on.

**Claims.** Each call is claimed before it is sent (``claims.claim(i, s, since)``: a lease in the ledger,
:mod:`protege.teachers.leases`): "send", "busy" (another process is sending it: set aside, tried again every
``POLL_S`` once the rest is sent) or "done" (answered elsewhere; the claimer has delivered it).

**Unreachable teacher.** ``UNREACHABLE_AFTER`` calls in a row that fail for the same transport reason
(connection refused, timeout, HTTP 401 / 403 / 404) stop the run with :class:`TeacherUnreachable`, and so
does a finished run where most calls failed for one of those reasons: the teacher is down or misconfigured,
which no retry and no later stage can fix.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter, deque
from typing import Callable, Protocol

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

    def alone_too_big(self, usd: float, tokens: int) -> bool:
        """Would this one call pass the whole budget on its own (even with nothing spent)? A budget of 0 is
        "send nothing": the run stops there, as for any budget reached, rather than fail every item."""
        return ((bool(self.usd_cap) and usd > self.usd_cap + 1e-12)
                or (bool(self.tok_cap) and tokens > self.tok_cap))

    def refused(self, usd: float, tokens: int) -> Answer:
        """The failed answer of a call that is not sent because it alone passes the budget."""
        if self.usd_cap is not None and usd > self.usd_cap + 1e-12:
            what = f"${usd:.4f}, more than the whole budget ${self.usd_cap:.4f}"
        else:
            what = f"{tokens:,} tokens, more than the whole token budget {self.tok_cap:,}"
        return Answer(label=None, status="error", extra={"reason": "over_budget", "requests": 0},
                      error=f"not sent: this one request is estimated at {what}; lower teacher.max_input_tokens / "
                            f"teacher.max_tokens or raise the budget")

    def refusal(self, usd: float, tokens: int) -> str:
        if self.usd_cap is not None and self.spent + usd > self.usd_cap + 1e-12:
            return f"budget ${self.usd_cap:.4f} reached: spent ${self.spent:.4f}, next call ~${usd:.4f}"
        return f"token budget {self.tok_cap:,} reached: used {self.tokens:,}, next call ~{tokens:,} tokens"


def _estimate(teacher: Teacher, req: dict) -> tuple[float, int]:
    est_tok = getattr(teacher, "estimate_tokens", None)
    return teacher.estimate_cost(req), (int(est_tok(req)) if est_tok else 0)


OnAnswer = Callable[[int, int, dict, Answer], None]
POLL_S = 0.25  # how often a call another process is sending is looked at again


class Claims(Protocol):
    def claim(self, i: int, s: int, since: float | None) -> str: ...  # "send" | "busy" | "done"


class NoClaims:
    """Every call is ours to send (one process, or a caller without a ledger)."""

    def claim(self, i: int, s: int, since: float | None) -> str:
        return "send"


def _claimed(todo: list[tuple[int, int]], claims: Claims):
    """The items of ``todo`` this process may send, in order; those another process holds come last,
    once their lease is free (or answered: then they are not yielded). Yields None for "nothing is free
    yet": the caller sends what it holds first (never waits on others while holding claims itself)."""
    deferred: deque = deque()
    for i, s in todo:
        got = claims.claim(i, s, None)
        if got == "send":
            yield i, s
        elif got == "busy":
            deferred.append((i, s, time.time(), time.monotonic()))
    while deferred:
        i, s, since, tried = deferred.popleft()
        if time.monotonic() - tried < POLL_S:
            deferred.appendleft((i, s, since, tried))
            yield None
            continue
        got = claims.claim(i, s, since)
        if got == "send":
            yield i, s
        elif got == "busy":
            deferred.append((i, s, since, time.monotonic()))


def send_batched(teacher: Teacher, texts: list[str], todo: list[tuple[int, int]], gate: BudgetGate,
                 on_answer: OnAnswer, batch_size: int, claims: Claims | None = None) -> str | None:
    """Batches of up to ``batch_size``, each cut to what the budget allows. Returns a stop reason or None."""
    items = _claimed(todo, claims or NoClaims())
    pending: list[tuple[int, int]] = []
    while True:
        done = False
        while len(pending) < batch_size:
            nxt = next(items, False)
            if nxt is False:
                done = True
                break
            if nxt is None:  # only calls other processes hold are left for now
                if pending:
                    break
                time.sleep(POLL_S / 5)
                continue
            pending.append(nxt)
        if not pending:
            if done:
                return None
            continue
        chunk, reqs, ests = [], [], []
        for i, s in pending[:batch_size]:
            req = teacher.request(texts[i], s)
            est = _estimate(teacher, req)
            if gate.alone_too_big(*est):  # never sent, whatever else is spent or in flight
                on_answer(i, s, req, gate.refused(*est))
                continue
            chunk.append((i, s)), reqs.append(req), ests.append(est)
        n_seen = min(batch_size, len(pending))
        k = 0
        while k < len(chunk) and gate.reserve(*ests[k]):
            k += 1
        if chunk and k == 0:
            return gate.refusal(*ests[0])
        answers = teacher.answer(reqs[:k]) if k else []
        for (i, s), req, est, ans in zip(chunk, reqs, ests, answers):
            gate.release(*est)
            gate.charge(ans)
            on_answer(i, s, req, ans)
        # the chunk's items not reserved stay first in line
        pending = chunk[k:] + pending[n_seen:]


def send_async(teacher, texts: list[str], todo: list[tuple[int, int]], gate: BudgetGate, on_answer: OnAnswer,
               concurrency: int, claims: Claims | None = None) -> str | None:
    """``concurrency`` workers on the teacher's event loop. Returns a stop reason or None."""
    return teacher.run(_pipeline(teacher, texts, todo, gate, on_answer, concurrency, claims or NoClaims()))


async def _pipeline(teacher, texts, todo, gate: BudgetGate, on_answer: OnAnswer, concurrency: int,
                    claims: Claims) -> str | None:
    it = iter(todo)
    deferred: deque = deque()  # (i, s, first seen busy, last tried): calls another process is sending
    cond = asyncio.Condition()
    st: dict = {"inflight": 0, "stop": None}

    async def next_item() -> tuple[int, int] | None:
        while st["stop"] is None:
            since = None
            try:
                i, s = next(it)
            except StopIteration:
                if not deferred:
                    return None
                i, s, since, tried = deferred.popleft()
                wait = POLL_S - (time.monotonic() - tried)
                if wait > 0:
                    await asyncio.sleep(wait)
            got = claims.claim(i, s, since)
            if got == "send":
                return i, s
            if got == "busy":
                deferred.append((i, s, time.time() if since is None else since, time.monotonic()))
        return None

    async def worker() -> None:
        while st["stop"] is None:
            nxt = await next_item()
            if nxt is None:
                return
            i, s = nxt
            req = teacher.request(texts[i], s)
            est = _estimate(teacher, req)
            if gate.alone_too_big(*est):  # never sent, whatever else is spent or in flight
                on_answer(i, s, req, gate.refused(*est))
                continue
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
        self.elsewhere = 0  # answered by another process sharing the ledger while this one waited
        self.streak: tuple[str | None, int, str] = (None, 0, "")  # (reason, calls in a row, last error)
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
        reason = (ans.extra or {}).get("reason") or "error"
        if not (ans.status != "ok" and reason == "over_budget"):  # refused before sending: no call made
            self.calls += 1
        self.usd += ans.cost_usd
        if ans.status != "ok":
            self.failed += 1
            self.failures[reason] += 1
            if reason in DOWN_REASONS:
                same = self.streak[0] == reason
                self.streak = (reason, self.streak[1] + 1 if same else 1, ans.error or "")
        if ans.status == "ok" or reason not in DOWN_REASONS:
            self.streak = (None, 0, "")
        self._done(i)

    def add_elsewhere(self, i: int) -> None:
        """An answer (or failure) another process recorded for a call this one left to it."""
        self.cache_hits += 1
        self.elsewhere += 1
        self._done(i)

    def _done(self, i: int) -> None:
        self.left[i] -= 1
        if self.left[i] == 0:
            self.items_done += 1
        self.advance(1, **self.fields())

    def down(self, finished: bool = False) -> tuple[str, int, str] | None:
        """(reason, calls, an error) when the teacher looks unreachable: ``UNREACHABLE_AFTER`` calls in a row
        failed for one transport reason, or (``finished``) most of this run's calls did."""
        reason, n, err = self.streak
        if reason is not None and n >= UNREACHABLE_AFTER:
            return reason, n, err
        if finished and self.calls:
            top = max(DOWN_REASONS, key=lambda r: self.failures.get(r, 0))
            if 2 * self.failures.get(top, 0) > self.calls:
                return top, self.failures[top], err if reason == top else ""
        return None


# Transport failures that say the teacher is down or misconfigured (not a passing fault); see down()
DOWN_REASONS = ("connection", "timeout", "http_401", "http_403", "http_404")
UNREACHABLE_AFTER = 8  # calls in a row (each after its retries) failing for one of them stop the run


class TeacherUnreachable(RuntimeError):
    """The teacher cannot be reached (or refuses every call): stop, say where and what to check."""


def unreachable_message(cfg, reason: str, failed: int, calls: int, error: str, not_sent: int = 0) -> str:
    """"teacher unreachable at URL (connection refused) for 240 of 240 calls: check teacher.base_url"."""
    url = getattr(cfg, "base_url", None) or "https://api.openai.com/v1 (the default teacher.base_url)"
    of = f"for {failed} of {calls} calls"
    if not_sent:
        of += f" (stopped after {failed} failures in a row; {not_sent} calls not sent)"
    if reason == "connection":
        m = re.search(r"\[Errno -?\d+\] ([^)\]]+)", error or "")
        why = m.group(1).strip().lower() if m else "connection failed"
        return f"teacher unreachable at {url} ({why}) {of}: check teacher.base_url"
    if reason == "timeout":
        return (f"teacher unreachable at {url} (no answer within teacher.timeout_s={cfg.timeout_s:g} s) {of}: check "
                f"teacher.base_url, or raise teacher.timeout_s")
    code = reason.removeprefix("http_")
    if code in ("401", "403"):
        return (f"teacher at {url} refused the API key (HTTP {code}) {of}: check teacher.api_key_env and the key "
                f"in that variable")
    return (f"teacher at {url} answered HTTP {code} {of}: check teacher.base_url and teacher.model "
            f"({getattr(cfg, 'model', '?')})")

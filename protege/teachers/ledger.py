"""The call ledger: every teacher call, in SQLite, keyed by a hash of what was asked.

Why a ledger and not a cache dict: teacher calls cost money. The same request (model, prompt, params,
sample index) is answered from here, so re-running a task — after a crash, a kill -9, or a change to a
later stage — never pays twice. Each successful call is committed on its own before the next result is
used, so a killed run loses at most the calls in flight. Tokens, $ and latency per call make the cost
case in the report a measurement rather than an estimate.

At scale: SQLite in WAL mode (readers never block the writer; several processes on one machine can
share a ledger, each write waiting up to 30 s for the lock), numbered migrations applied under an
exclusive lock (two processes opening a new ledger at once do not race), ``synchronous=NORMAL`` (a
commit survives a killed process; only a power cut can lose the last commits). Ledgers written on
different machines (``protege generate --shard i/n``) are combined with :meth:`Ledger.merge`.

Per call the ledger keeps: status and, for failures, a ``reason`` code (``rate_limited``,
``not_a_label``, ...) and message; ``requests`` (HTTP requests sent for it, over all runs: retries and
re-asks included), ``attempts`` (runs that tried it), tokens and $ (accumulated over failed runs too:
money paid is never forgotten), latency and cache ``hits``. ``runs`` logs each labelling pass with
how far it got. ``leases`` holds the claims of processes sharing the ledger on requests they are
sending (:mod:`protege.teachers.leases`), so two processes never send the same request at once.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from protege.sqlite_wal import connect_wal
from protege.teachers.leases import MIGRATION as _LEASES_MIGRATION

MIGRATIONS: list[str] = [
    # 1: calls
    """
    CREATE TABLE calls (
        key TEXT PRIMARY KEY,
        model TEXT NOT NULL,
        stage TEXT NOT NULL,
        sample INTEGER NOT NULL DEFAULT 0,
        request TEXT NOT NULL,
        response TEXT,
        status TEXT NOT NULL,
        error TEXT,
        tokens_in INTEGER NOT NULL DEFAULT 0,
        tokens_out INTEGER NOT NULL DEFAULT 0,
        cost_usd REAL NOT NULL DEFAULT 0,
        latency_s REAL NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 1,
        hits INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    );
    CREATE INDEX calls_model_stage ON calls(model, stage);
    """,
    # 2: failure reasons, HTTP requests per call, tokens ever paid, the runs log
    """
    ALTER TABLE calls ADD COLUMN reason TEXT;
    ALTER TABLE calls ADD COLUMN requests INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE calls ADD COLUMN reasks INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE calls ADD COLUMN tokens_paid INTEGER NOT NULL DEFAULT 0;
    UPDATE calls SET requests = attempts, tokens_paid = tokens_in + tokens_out;
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        stage TEXT NOT NULL,
        model TEXT NOT NULL,
        started_at REAL NOT NULL,
        finished_at REAL,
        status TEXT NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        cache_hits INTEGER NOT NULL DEFAULT 0,
        calls INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        usd REAL NOT NULL DEFAULT 0,
        note TEXT
    );
    """,
    # 3: leases — a request is claimed before it is sent (protege.teachers.leases)
    _LEASES_MIGRATION,
]


def request_key(model: str, request: Any, sample: int = 0) -> str:
    """Hash of everything that determines the answer. Same key ⇒ same (paid-for) answer."""
    blob = json.dumps({"model": model, "request": request, "sample": sample}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class BudgetExceeded(RuntimeError):
    """Raised before a call is sent when it would take spend past the task's budget."""


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = connect_wal(self.path, timeout=30)
        self._migrate()

    def _migrate(self) -> None:
        migrations = MIGRATIONS
        self.db.execute("BEGIN IMMEDIATE")  # exclusive: a second process opening a new ledger waits, then sees it done
        try:
            self.db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = self.db.execute("SELECT max(version) FROM schema_version").fetchone()
            current = row[0] or 0
            for i, sql in enumerate(migrations[current:], start=current + 1):
                for stmt in (s for s in sql.split(";") if s.strip()):
                    self.db.execute(stmt)
                self.db.execute("INSERT INTO schema_version VALUES (?)", (i,))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- lookups -------------------------------------------------------------------------------
    def lookup(self, keys: Iterable[str]) -> dict[str, dict]:
        """Successful responses for the keys that have one; counts each as a cache hit."""
        keys = list(keys)
        out: dict[str, dict] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            q = f"SELECT key, response FROM calls WHERE status='ok' AND key IN ({','.join('?' * len(chunk))})"
            for k, resp in self.db.execute(q, chunk):
                out[k] = json.loads(resp)
        if out:
            with self.transaction():  # one transaction, not one per key: 1M hits in seconds
                self.db.executemany("UPDATE calls SET hits = hits + 1 WHERE key = ?", [(k,) for k in out])
        return out

    def lookup_failed(self, keys: Iterable[str], reasons: Iterable[str]) -> dict[str, dict]:
        """Failed calls among ``keys`` whose reason is one of ``reasons``: {key: {"error", "reason"}}; counted
        as cache hits. For re-runs that should not pay again for an answer the model already gave but that
        was unusable (not a label, bad JSON, ...)."""
        keys, reasons = list(keys), list(reasons)
        out: dict[str, dict] = {}
        if not reasons:
            return out
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            q = (f"SELECT key, error, reason FROM calls WHERE status!='ok' AND key IN ({','.join('?' * len(chunk))}) "
                 f"AND reason IN ({','.join('?' * len(reasons))})")
            for k, err, reason in self.db.execute(q, chunk + reasons):
                out[k] = {"error": err, "reason": reason}
        if out:
            with self.transaction():
                self.db.executemany("UPDATE calls SET hits = hits + 1 WHERE key = ?", [(k,) for k in out])
        return out

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def record(self, key: str, *, model: str, stage: str, request: Any, response: Any | None, status: str = "ok",
               error: str | None = None, sample: int = 0, tokens_in: int = 0, tokens_out: int = 0,
               cost_usd: float = 0.0, latency_s: float = 0.0, reason: str | None = None, requests: int = 1,
               reasks: int = 0) -> None:
        """Store one call, committed before this returns. A failed call is recorded too (and retried on the
        next run); a success replaces it; a failure never replaces a success (two processes sharing a
        ledger may both have sent it). $, tokens paid and HTTP requests accumulate over attempts."""
        self.db.execute(
            """INSERT INTO calls (key, model, stage, sample, request, response, status, error, tokens_in, tokens_out,
                                  cost_usd, latency_s, created_at, reason, requests, reasks, tokens_paid)
               VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)
               ON CONFLICT(key) DO UPDATE SET
                   response = CASE WHEN calls.status = 'ok' AND excluded.status != 'ok' THEN calls.response ELSE excluded.response END,
                   error = CASE WHEN calls.status = 'ok' AND excluded.status != 'ok' THEN calls.error ELSE excluded.error END,
                   reason = CASE WHEN calls.status = 'ok' AND excluded.status != 'ok' THEN calls.reason ELSE excluded.reason END,
                   tokens_in = CASE WHEN calls.status = 'ok' AND excluded.status != 'ok' THEN calls.tokens_in ELSE excluded.tokens_in END,
                   tokens_out = CASE WHEN calls.status = 'ok' AND excluded.status != 'ok' THEN calls.tokens_out ELSE excluded.tokens_out END,
                   latency_s = CASE WHEN calls.status = 'ok' AND excluded.status != 'ok' THEN calls.latency_s ELSE excluded.latency_s END,
                   reasks = CASE WHEN calls.status = 'ok' AND excluded.status != 'ok' THEN calls.reasks ELSE excluded.reasks END,
                   status = CASE WHEN calls.status = 'ok' THEN 'ok' ELSE excluded.status END,
                   cost_usd = calls.cost_usd + excluded.cost_usd, tokens_paid = calls.tokens_paid + excluded.tokens_paid,
                   requests = calls.requests + excluded.requests,
                   attempts = calls.attempts + 1, created_at = excluded.created_at""",
            (key, model, stage, sample, json.dumps(request, ensure_ascii=False),
             None if response is None else json.dumps(response, ensure_ascii=False), status, error,
             tokens_in, tokens_out, cost_usd, latency_s, time.time(), reason, requests, reasks, tokens_in + tokens_out),
        )

    # -- accounting ----------------------------------------------------------------------------
    def spent(self, model: str | None = None) -> float:
        q, args = "SELECT coalesce(sum(cost_usd), 0) FROM calls", ()
        if model:
            q, args = q + " WHERE model = ?", (model,)
        return float(self.db.execute(q, args).fetchone()[0])

    def tokens_used(self, model: str | None = None) -> int:
        """Tokens (in + out) ever paid for, failed attempts included: what ``budget_tokens`` caps."""
        q, args = "SELECT coalesce(sum(tokens_paid), 0) FROM calls", ()
        if model:
            q, args = q + " WHERE model = ?", (model,)
        return int(self.db.execute(q, args).fetchone()[0])

    def check_budget(self, budget_usd: float | None, next_cost_usd: float) -> None:
        if budget_usd is None:
            return
        spent = self.spent()
        if spent + next_cost_usd > budget_usd:
            raise BudgetExceeded(f"budget ${budget_usd:.4f} reached: spent ${spent:.4f}, next call ~${next_cost_usd:.4f}")

    def latencies(self, model: str, stage: str | None = None) -> list[float]:
        q, args = "SELECT latency_s FROM calls WHERE status='ok' AND model=?", [model]
        if stage:
            q += " AND stage=?"
            args.append(stage)
        return [r[0] for r in self.db.execute(q, args)]

    def summary(self) -> list[dict]:
        rows = self.db.execute(
            """SELECT model, stage, count(*), sum(status='ok'), sum(status!='ok'), sum(hits), sum(tokens_in),
                      sum(tokens_out), sum(cost_usd), avg(latency_s) FROM calls GROUP BY model, stage ORDER BY model, stage"""
        ).fetchall()
        cols = ["model", "stage", "calls", "ok", "failed", "cache_hits", "tokens_in", "tokens_out", "cost_usd", "mean_latency_s"]
        return [dict(zip(cols, r)) for r in rows]

    def count(self, status: str | None = None) -> int:
        if status:
            return int(self.db.execute("SELECT count(*) FROM calls WHERE status=?", (status,)).fetchone()[0])
        return int(self.db.execute("SELECT count(*) FROM calls").fetchone()[0])

    # -- scale: stats, runs, merge ---------------------------------------------------------------
    def stats(self) -> list[dict]:
        """Per (model, stage): calls, ok, failed, failures by reason, HTTP requests, re-asks, cache hits,
        tokens, $ and latency p50 / p95 of successful calls. What ``protege ledger`` prints."""
        rows = self.db.execute(
            """SELECT model, stage, count(*), sum(status='ok'), sum(status!='ok'), sum(requests), sum(reasks),
                      sum(hits), sum(tokens_in), sum(tokens_out), sum(tokens_paid), sum(cost_usd)
               FROM calls GROUP BY model, stage ORDER BY model, stage""").fetchall()
        cols = ["model", "stage", "calls", "ok", "failed", "requests", "reasks", "cache_hits", "tokens_in",
                "tokens_out", "tokens_paid", "cost_usd"]
        out = []
        for r in rows:
            d = dict(zip(cols, r))
            lat = sorted(x for (x,) in self.db.execute(
                "SELECT latency_s FROM calls WHERE status='ok' AND model=? AND stage=?", (d["model"], d["stage"])))
            d["latency_p50_s"] = _quantile(lat, 0.50)
            d["latency_p95_s"] = _quantile(lat, 0.95)
            d["failures"] = dict(self.db.execute(
                """SELECT coalesce(reason, 'unknown'), count(*) FROM calls WHERE status!='ok' AND model=? AND stage=?
                   GROUP BY 1 ORDER BY 2 DESC""", (d["model"], d["stage"])).fetchall())
            out.append(d)
        return out

    def start_run(self, stage: str, model: str, requests: int, cache_hits: int) -> int:
        cur = self.db.execute("INSERT INTO runs (stage, model, started_at, status, requests, cache_hits) "
                              "VALUES (?,?,?,?,?,?)", (stage, model, time.time(), "running", requests, cache_hits))
        return int(cur.lastrowid)

    def finish_run(self, run_id: int, status: str, *, calls: int, failed: int, usd: float, note: str | None = None) -> None:
        self.db.execute("UPDATE runs SET finished_at=?, status=?, calls=?, failed=?, usd=?, note=? WHERE id=?",
                        (time.time(), status, calls, failed, usd, note, run_id))

    def runs(self, limit: int = 20) -> list[dict]:
        cur = self.db.execute("SELECT * FROM runs ORDER BY id DESC LIMIT ?", (limit,))
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    def merge(self, other: str | Path) -> dict:
        """Add another ledger's calls (another machine's shard) into this one; idempotent.

        A key only in ``other`` is copied. A key in both keeps one answer: a success beats a failure,
        and of two successes the earlier one stays (merging the same file twice changes nothing). $,
        tokens and requests of a key in both are the larger of the two (the same call recorded twice
        is not paid twice; two machines that really both paid for one key under-count by one call).
        """
        other = Path(other)
        if not other.is_file():
            raise FileNotFoundError(f"ledger {other} does not exist")
        if other.resolve() == self.path.resolve():
            raise ValueError(f"cannot merge {other} into itself")
        Ledger(other).close()  # bring it to the current schema first
        before = self.count()
        cols = ("key, model, stage, sample, request, response, status, error, tokens_in, tokens_out, cost_usd, "
                "latency_s, attempts, hits, created_at, reason, requests, reasks, tokens_paid")
        self.db.execute("ATTACH DATABASE ? AS other", (str(other),))
        try:
            with self.transaction():
                replaced = self.db.execute(
                    """SELECT count(*) FROM other.calls o JOIN calls c ON c.key = o.key
                       WHERE (o.status = 'ok' AND c.status != 'ok')""").fetchone()[0]
                self.db.execute(
                    f"""INSERT INTO calls ({cols}) SELECT {cols} FROM other.calls WHERE true
                        ON CONFLICT(key) DO UPDATE SET
                          response = CASE WHEN calls.status != 'ok' AND excluded.status = 'ok' THEN excluded.response
                                          WHEN calls.status = excluded.status AND excluded.created_at < calls.created_at
                                          THEN excluded.response ELSE calls.response END,
                          error = CASE WHEN calls.status != 'ok' AND excluded.status = 'ok' THEN excluded.error
                                       ELSE calls.error END,
                          reason = CASE WHEN calls.status != 'ok' AND excluded.status = 'ok' THEN excluded.reason
                                        ELSE calls.reason END,
                          latency_s = CASE WHEN calls.status != 'ok' AND excluded.status = 'ok' THEN excluded.latency_s
                                           ELSE calls.latency_s END,
                          status = CASE WHEN excluded.status = 'ok' THEN 'ok' ELSE calls.status END,
                          cost_usd = max(calls.cost_usd, excluded.cost_usd),
                          tokens_paid = max(calls.tokens_paid, excluded.tokens_paid),
                          requests = max(calls.requests, excluded.requests),
                          hits = max(calls.hits, excluded.hits),
                          created_at = min(calls.created_at, excluded.created_at)""")
                self.db.execute("INSERT INTO runs (stage, model, started_at, finished_at, status, requests, cache_hits, "
                                "calls, failed, usd, note) SELECT stage, model, started_at, finished_at, status, requests, "
                                "cache_hits, calls, failed, usd, coalesce(note, '') || ' [merged from ' || ? || ']' "
                                "FROM other.runs o WHERE NOT EXISTS (SELECT 1 FROM runs r WHERE r.started_at = "
                                "o.started_at AND r.stage = o.stage AND r.model = o.model)", (str(other),))
        finally:
            self.db.execute("DETACH DATABASE other")
        n_other = int(self.db.execute("SELECT count(*) FROM calls").fetchone()[0])
        return {"source": str(other), "added": n_other - before, "now_ok": int(replaced), "calls": n_other}


def _quantile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated quantile of sorted ``xs`` (numpy's default), None when empty."""
    if not xs:
        return None
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

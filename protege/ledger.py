"""The call ledger: every teacher call, in SQLite, keyed by a hash of what was asked.

Why a ledger and not a cache dict: teacher calls cost money. The same request (model, prompt, params,
sample index) is answered from here, so re-running a task — after a crash, a kill -9, or a change to a
later stage — never pays twice. Each successful call is committed on its own before the next result is
used, so a killed run loses at most the calls in flight. Tokens, $ and latency per call make the cost
case in the report a measurement rather than an estimate.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable

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
        self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self._migrate()

    def _migrate(self) -> None:
        self.db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = self.db.execute("SELECT max(version) FROM schema_version").fetchone()
        current = row[0] or 0
        for i, sql in enumerate(MIGRATIONS[current:], start=current + 1):
            self.db.execute("BEGIN")
            for stmt in (s for s in sql.split(";") if s.strip()):
                self.db.execute(stmt)
            self.db.execute("INSERT INTO schema_version VALUES (?)", (i,))
            self.db.execute("COMMIT")

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
            self.db.executemany("UPDATE calls SET hits = hits + 1 WHERE key = ?", [(k,) for k in out])
        return out

    def record(self, key: str, *, model: str, stage: str, request: Any, response: Any | None, status: str = "ok",
               error: str | None = None, sample: int = 0, tokens_in: int = 0, tokens_out: int = 0,
               cost_usd: float = 0.0, latency_s: float = 0.0) -> None:
        """Store one call. A failed call is recorded too (and retried on the next run); a success replaces it."""
        self.db.execute(
            """INSERT INTO calls (key, model, stage, sample, request, response, status, error, tokens_in, tokens_out,
                                  cost_usd, latency_s, created_at)
               VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)
               ON CONFLICT(key) DO UPDATE SET response=excluded.response, status=excluded.status, error=excluded.error,
                   tokens_in=excluded.tokens_in, tokens_out=excluded.tokens_out,
                   cost_usd=calls.cost_usd + excluded.cost_usd, latency_s=excluded.latency_s,
                   attempts=calls.attempts + 1, created_at=excluded.created_at""",
            (key, model, stage, sample, json.dumps(request, ensure_ascii=False),
             None if response is None else json.dumps(response, ensure_ascii=False), status, error,
             tokens_in, tokens_out, cost_usd, latency_s, time.time()),
        )

    # -- accounting ----------------------------------------------------------------------------
    def spent(self, model: str | None = None) -> float:
        q, args = "SELECT coalesce(sum(cost_usd), 0) FROM calls", ()
        if model:
            q, args = q + " WHERE model = ?", (model,)
        return float(self.db.execute(q, args).fetchone()[0])

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

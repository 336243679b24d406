"""What the gateway saw: SQLite tables for requests, the human review queue, shadow checks and drift.

``<run>/serve/traffic.sqlite`` (WAL, numbered migrations like the ledger):

- ``requests`` — one row per answered input: who answered, label, confidence, latency. The input text
  is stored only when it left the student (escalated to the teacher, queued for review, shadowed) or
  when capture mode is on: those are the rows ``protege redistill`` learns from. Student-only answers
  keep no text.
- ``review`` — the human review queue; ``protege review --queue`` lists it and ``--answer`` fills it.
  One item per text (``text_key``, a SHA-256 of the text): the same text sent again gets the id of the
  item already there — pending or answered — instead of a second item for a person to answer twice.
- ``shadow`` — student vs teacher on a sample of student-answered traffic (live agreement).
- ``drift`` — periodic snapshots of the live drift figures (``protege drift`` reads the latest).

High-volume rows go through one background writer thread (batched commits); the review queue, whose
ids callers get back, is written synchronously.
"""

from __future__ import annotations

import hashlib
import json
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from protege.sqlite_wal import connect_wal

MIGRATIONS = [
    # 1
    """
    CREATE TABLE requests (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        endpoint TEXT NOT NULL,
        mode TEXT NOT NULL,
        answered_by TEXT NOT NULL,
        label TEXT,
        confidence REAL,
        threshold REAL,
        student_label TEXT,
        teacher_label TEXT,
        teacher_probs TEXT,
        teacher_soft TEXT,
        teacher_usd REAL NOT NULL DEFAULT 0,
        review_id INTEGER,
        latency_ms REAL NOT NULL,
        text TEXT
    );
    CREATE INDEX requests_ts ON requests(ts);
    CREATE TABLE review (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        text TEXT NOT NULL,
        student_label TEXT,
        student_confidence REAL,
        status TEXT NOT NULL DEFAULT 'pending',
        answer TEXT,
        reviewer TEXT,
        answered_at REAL
    );
    CREATE INDEX review_status ON review(status);
    CREATE TABLE shadow (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        text TEXT,
        student_label TEXT,
        student_confidence REAL,
        teacher_label TEXT,
        teacher_probs TEXT,
        agree INTEGER
    );
    CREATE TABLE drift (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        snapshot TEXT NOT NULL
    );
    """,
    # 2: one review item per text
    """
    ALTER TABLE review ADD COLUMN text_key TEXT;
    UPDATE review SET text_key = protege_text_key(text);
    CREATE INDEX review_text_key ON review(text_key);
    """,
]

_COLUMNS = {
    "requests": ("ts", "endpoint", "mode", "answered_by", "label", "confidence", "threshold", "student_label",
                 "teacher_label", "teacher_probs", "teacher_soft", "teacher_usd", "review_id", "latency_ms", "text"),
    "shadow": ("ts", "text", "student_label", "student_confidence", "teacher_label", "teacher_probs", "agree"),
    "drift": ("ts", "snapshot"),
}


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def connect(path: Path) -> sqlite3.Connection:
    db = connect_wal(path, timeout=30)
    db.create_function("protege_text_key", 1, text_key, deterministic=True)  # migration 2 backfills with it
    return db


def migrate(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    current = db.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
    for i, sql in enumerate(MIGRATIONS[current:], start=current + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            if (db.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0) >= i:
                db.execute("COMMIT")  # another process migrated first
                continue
            for stmt in (s for s in sql.split(";") if s.strip()):
                db.execute(stmt)
            db.execute("INSERT INTO schema_version VALUES (?)", (i,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def _json(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, (list, dict)) else v


class TrafficStore:
    def __init__(self, path: str | Path, *, writer: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = connect(self.path)
        migrate(self.db)
        self.lock = threading.Lock()
        self._q: queue.Queue = queue.Queue()
        self._thread = None
        if writer:
            self._thread = threading.Thread(target=self._write_loop, name="protege-traffic-writer", daemon=True)
            self._thread.start()

    # -- writes ------------------------------------------------------------------------------
    def add(self, table: str, **row: Any) -> None:
        """Queue a row for the background writer (requests / shadow / drift)."""
        row.setdefault("ts", time.time())
        if self._thread is None:
            self._insert([(table, row)])
        else:
            self._q.put((table, row))

    def _insert(self, items: list[tuple[str, dict]]) -> None:
        with self.lock:
            self.db.execute("BEGIN")
            try:
                for table, row in items:
                    cols = _COLUMNS[table]
                    self.db.execute(f"INSERT INTO {table} ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})",
                                    [_json(row.get(c)) for c in cols])
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def _write_loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                self._q.task_done()
                return
            batch = [item]
            while len(batch) < 500:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._q.put(None)  # handle the stop after this batch
                    self._q.task_done()
                    break
                batch.append(nxt)
            try:
                self._insert(batch)
            except sqlite3.Error as e:  # never take the server down for a log row
                import logging

                logging.getLogger("protege.serve").error("traffic store: %d rows not written: %s", len(batch), e)
            finally:
                for _ in batch:
                    self._q.task_done()

    def flush(self) -> None:
        """Block until every queued row is committed."""
        if self._thread is not None:
            self._q.join()

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._q.put(None)
            self._thread.join(timeout=30)
        self.db.close()

    # -- the review queue --------------------------------------------------------------------
    def enqueue_review(self, text: str, student_label: str | None, confidence: float | None) -> int:
        """The id of the review item for ``text``: the existing one (any status), else a new pending one.
        Looked up and inserted in one write transaction, so gateways sharing the store agree too."""
        key = text_key(text)
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                row = self.db.execute("SELECT id FROM review WHERE text_key = ? AND text = ? ORDER BY id LIMIT 1",
                                      (key, text)).fetchone()
                if row is None:
                    row = (self.db.execute("INSERT INTO review (ts, text, student_label, student_confidence, text_key) "
                                           "VALUES (?,?,?,?,?)", (time.time(), text, student_label, confidence, key))
                           .lastrowid,)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            return int(row[0])

    _REVIEW = ("id", "ts", "text", "student_label", "student_confidence", "status", "answer", "reviewer", "answered_at")

    def review_items(self, status: str | None = "pending", limit: int | None = None) -> list[dict]:
        q, args = f"SELECT {','.join(self._REVIEW)} FROM review", []
        if status:
            q += " WHERE status = ?"
            args.append(status)
        q += " ORDER BY id" + (f" LIMIT {int(limit)}" if limit else "")
        return [dict(zip(self._REVIEW, r)) for r in self.query(q, tuple(args))]

    def review_item(self, item_id: int) -> dict | None:
        rows = self.query(f"SELECT {','.join(self._REVIEW)} FROM review WHERE id = ?", (int(item_id),))
        return dict(zip(self._REVIEW, rows[0])) if rows else None

    def answer_review(self, item_id: int, answer: str, reviewer: str | None = None) -> None:
        status = "dropped" if answer == "drop" else "answered"
        with self.lock:
            cur = self.db.execute("UPDATE review SET status=?, answer=?, reviewer=?, answered_at=? WHERE id=?",
                                  (status, None if answer == "drop" else answer, reviewer, time.time(), item_id))
        if cur.rowcount == 0:
            raise ValueError(f"review item {item_id} does not exist in {self.path}")

    def pending_reviews(self) -> int:
        with self.lock:
            return int(self.db.execute("SELECT count(*) FROM review WHERE status='pending'").fetchone()[0])

    # -- reads for drift / redistill ---------------------------------------------------------
    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def recent_confidences(self, n: int) -> list[float]:
        rows = self.query("SELECT confidence FROM requests WHERE confidence IS NOT NULL ORDER BY id DESC LIMIT ?", (n,))
        return [r[0] for r in rows][::-1]

    def recent_shadow(self, n: int) -> list[int]:
        rows = self.query("SELECT agree FROM shadow WHERE agree IS NOT NULL ORDER BY id DESC LIMIT ?", (n,))
        return [int(r[0]) for r in rows][::-1]

    def latest_drift(self) -> dict | None:
        rows = self.query("SELECT ts, snapshot FROM drift ORDER BY id DESC LIMIT 1")
        return {"ts": rows[0][0], **json.loads(rows[0][1])} if rows else None

    def counts(self) -> dict:
        by = dict(self.query("SELECT answered_by, count(*) FROM requests GROUP BY answered_by"))
        return {"requests": sum(by.values()), "answered_by": by,
                "shadow": self.query("SELECT count(*) FROM shadow")[0][0],
                "review": dict(self.query("SELECT status, count(*) FROM review GROUP BY status"))}

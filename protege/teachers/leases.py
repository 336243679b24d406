"""Claims on ledger keys, so that processes sharing one ledger never send the same request at once.

Before a call is sent its key is *leased* in the ledger's ``leases`` table (migration 3): one row per
key with the owner (a random id per run, plus pid and host for people reading the table) and an expiry,
taken in a ``BEGIN IMMEDIATE`` transaction, so two processes cannot both take it. What a process finds
when it tries:

* the call is already answered (``status='ok'``: another process got it since this one's ledger
  lookup) → the answer is read from the ledger, nothing is sent;
* a live lease of another owner → the key is put aside and tried again later (the pipeline sends the
  rest meanwhile). When the owner records its outcome (success *or* failure) and gives the lease back,
  that outcome is taken as this run's too: a call another process just tried is not tried again now;
* an expired lease (its process was killed, or its machine is gone), or a lease held by a pid that no
  longer runs on this host (kill -9 here: taken over at once, no need to wait for the expiry) → taken
  over, and sent.

A lease lives ``ttl_s`` (60 s) and is renewed every ``ttl_s / 6`` by a heartbeat thread on its own
connection, so a call slower than the TTL (retries, a slow model) keeps its claim while its process
lives. The lease is given back in the same transaction that records the call's outcome. Sharded runs
(``--shard i/n``, one ledger per machine) never contend; this is for processes on one ledger.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from typing import Any

LEASE_TTL_S = 60.0

MIGRATION = """
    CREATE TABLE leases (
        key TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        pid INTEGER NOT NULL,
        host TEXT NOT NULL,
        taken_at REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE INDEX leases_owner ON leases(owner);
"""


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):  # alive (someone else's), or we cannot tell: treat as alive
        return False
    return False


class Leases:
    """This process's claims on one ledger. All calls from one thread at a time (the ledger's)."""

    def __init__(self, ledger, ttl_s: float = LEASE_TTL_S):
        self.ledger, self.db, self.ttl = ledger, ledger.db, float(ttl_s)
        self.owner, self.pid, self.host = uuid.uuid4().hex, os.getpid(), socket.gethostname()
        self.taken_over = 0
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def claim(self, key: str, since: float | None = None) -> tuple[str, Any]:
        """("send", None) — leased to us; ("busy", None) — another live owner holds it; ("ok", response) —
        already answered; ("failed", {"error", "reason"}) — ``since`` is set (we found it busy then) and
        the owner recorded a failure after that."""
        now = time.time()
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT status, response, error, reason, created_at FROM calls WHERE key = ?",
                             (key,)).fetchone()
            lease = db.execute("SELECT owner, pid, host, expires_at FROM leases WHERE key = ?", (key,)).fetchone()
            if row is not None and row[0] == "ok":
                out = ("ok", json.loads(row[1]))
            elif lease is not None and lease[0] != self.owner and lease[3] > now and not (
                    lease[2] == self.host and _pid_gone(int(lease[1]))):
                out = ("busy", None)
            elif since is not None and row is not None and row[4] >= since:
                out = ("failed", {"error": row[2], "reason": row[3]})
            else:
                if lease is not None and lease[0] != self.owner:
                    self.taken_over += 1
                db.execute("INSERT OR REPLACE INTO leases (key, owner, pid, host, taken_at, expires_at) "
                           "VALUES (?,?,?,?,?,?)", (key, self.owner, self.pid, self.host, now, now + self.ttl))
                out = ("send", None)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return out

    def release(self, key: str) -> None:
        """Give one lease back (inside the caller's transaction when there is one)."""
        self.db.execute("DELETE FROM leases WHERE key = ? AND owner = ?", (key, self.owner))

    def release_all(self) -> None:
        self.db.execute("DELETE FROM leases WHERE owner = ?", (self.owner,))

    # -- heartbeat -----------------------------------------------------------------------------
    def start(self) -> "Leases":
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="protege-leases", daemon=True)
        self._beat.start()
        return self

    def _heartbeat(self) -> None:
        db = sqlite3.connect(str(self.ledger.path), timeout=30, isolation_level=None)
        try:
            while not self._stop.wait(self.ttl / 6):
                try:
                    db.execute("UPDATE leases SET expires_at = ? WHERE owner = ?", (time.time() + self.ttl, self.owner))
                except sqlite3.OperationalError:  # busy past 30 s: try again at the next beat
                    pass
        finally:
            db.close()

    def stop(self) -> None:
        """Stop renewing and give back every lease still held (calls not sent, or cut short)."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
            self._beat = None
        self.release_all()

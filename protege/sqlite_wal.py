"""Open a SQLite file in WAL mode so that several processes can share it from its first second.

``PRAGMA journal_mode=WAL`` needs a moment of exclusive access to the file. When several processes open a
*new* file at once (two ``protege generate`` runs on one ``--out``, Ray workers, gateway workers), SQLite can
answer that pragma with ``database is locked`` straight away, without going through the busy timeout that
covers ordinary statements. So the switch is retried here, with backoff, until the connection's own timeout.
"""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path


def _busy(exc: sqlite3.OperationalError) -> bool:
    msg = str(exc).lower()
    return "locked" in msg or "busy" in msg


def connect_wal(path: str | Path, timeout: float = 30.0) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL journal, ``synchronous=NORMAL``."""
    db = sqlite3.connect(str(path), timeout=timeout, isolation_level=None, check_same_thread=False)
    deadline = time.monotonic() + timeout
    wait = 0.005
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or time.monotonic() > deadline:
                db.close()
                raise
            time.sleep(wait * (0.5 + random.random()))
            wait = min(wait * 2, 0.25)
    db.execute("PRAGMA synchronous=NORMAL")
    return db

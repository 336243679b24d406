"""Many processes opening one *new* SQLite file at the same instant all get a working connection.

The switch to WAL needs the file to itself for a moment; SQLite can refuse it with ``database is locked``
without waiting out the busy timeout. CI hit this with two ``protege generate`` runs on one ``--out``.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from protege.serve.store import connect as store_connect
from protege.teachers.ledger import Ledger

PROCS = 8
TRIALS = 25


def _open(kind: str, path: str, barrier, results) -> None:
    barrier.wait()
    try:
        if kind == "ledger":
            with Ledger(path) as led:
                results.put(("ok", led.db.execute("PRAGMA journal_mode").fetchone()[0]))
        else:
            db = store_connect(Path(path))
            results.put(("ok", db.execute("PRAGMA journal_mode").fetchone()[0]))
            db.close()
    except Exception as exc:  # noqa: BLE001 - the failure itself is what the test reports
        results.put(("error", repr(exc)))


def _race(kind: str, root: Path) -> list[tuple[str, str]]:
    ctx = mp.get_context("fork")
    out = []
    for trial in range(TRIALS):
        path = root / f"{kind}{trial}.sqlite"
        barrier, results = ctx.Barrier(PROCS), ctx.Queue()
        procs = [ctx.Process(target=_open, args=(kind, str(path), barrier, results)) for _ in range(PROCS)]
        for p in procs:
            p.start()
        out += [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
    return out


def test_processes_opening_a_new_ledger_at_once_all_get_wal(tmp_path):
    got = _race("ledger", tmp_path)
    assert [r for r in got if r != ("ok", "wal")] == []
    assert len(got) == PROCS * TRIALS


def test_processes_opening_a_new_traffic_store_at_once_all_get_wal(tmp_path):
    got = _race("store", tmp_path)
    assert [r for r in got if r != ("ok", "wal")] == []

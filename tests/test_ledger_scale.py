"""The ledger at scale: migrations from an old file, several processes at once, tens of thousands of
rows, merging ledgers from other machines, stats, and the budget gate under concurrency."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from protege import progress
from protege.teachers.calls import BudgetGate
from protege.stages.generate import label_with_ledger
from protege.teachers.ledger import MIGRATIONS, BudgetExceeded, Ledger, request_key
from protege.task import parse_task
from protege.teachers.base import Answer, Teacher
from tiny import base_task, deep_merge


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setitem(progress.QUIET, "on", True)


def _rec(led, key, status="ok", cost=0.0, **kw):
    led.record(key, model=kw.pop("model", "m"), stage=kw.pop("stage", "generate"), request={"q": key},
               response={"k": key} if status == "ok" else None, status=status,
               error=None if status == "ok" else "boom", cost_usd=cost, **kw)


# -- migrations ------------------------------------------------------------------------------------

def test_a_version_1_ledger_is_migrated_in_place(tmp_path):
    p = tmp_path / "old.sqlite"
    db = sqlite3.connect(p)  # a ledger as the first release wrote it
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for stmt in (s for s in MIGRATIONS[0].split(";") if s.strip()):
        db.execute(stmt)
    db.execute("INSERT INTO schema_version VALUES (1)")
    key = request_key("m", {"q": 1})
    db.execute("INSERT INTO calls (key, model, stage, request, response, status, tokens_in, tokens_out, cost_usd, "
               "attempts, created_at) VALUES (?, 'm', 'generate', '{}', '{\"label\": \"a\"}', 'ok', 10, 2, 0.5, 2, 0)",
               (key,))
    db.commit()
    db.close()
    with Ledger(p) as led:
        assert [r[0] for r in led.db.execute("SELECT version FROM schema_version")] == list(range(1, len(MIGRATIONS) + 1))
        row = led.db.execute("SELECT requests, tokens_paid, reason, reasks FROM calls").fetchone()
        assert row == (2, 12, None, 0)
        assert led.lookup([key]) == {key: {"label": "a"}}  # paid-for answers survive the upgrade
        assert led.spent() == 0.5 and led.tokens_used() == 12
        assert led.runs() == []


WRITER = """
import sys
from protege.teachers.ledger import Ledger
path, start, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with Ledger(path) as led:
    for i in range(start, start + n):
        led.record(f"k{i}", model="m", stage="generate", request={"i": i}, response={"i": i}, cost_usd=0.001)
"""


def test_several_processes_open_and_write_one_new_ledger_at_once(tmp_path):
    p = str(tmp_path / "shared.sqlite")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, p, str(1000 * w), "150"], stderr=subprocess.PIPE)
             for w in range(4)]
    for pr in procs:
        _, err = pr.communicate(timeout=120)
        assert pr.returncode == 0, err.decode()[-2000:]
    with Ledger(p) as led:
        assert led.count() == 600 and led.spent() == pytest.approx(0.6)
        assert led.db.execute("SELECT count(*) FROM schema_version").fetchone()[0] == len(MIGRATIONS)


# -- record semantics ----------------------------------------------------------------------------------

def test_a_failure_never_replaces_a_success(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as led:
        _rec(led, "k", cost=0.1, tokens_in=10, tokens_out=1, requests=1)
        _rec(led, "k", status="error", cost=0.05, reason="timeout", requests=3, tokens_in=7)  # a second process' late failure
        row = led.db.execute("SELECT status, response, reason, cost_usd, requests, tokens_paid, tokens_in FROM calls").fetchone()
        assert row[:3] == ("ok", json.dumps({"k": "k"}), None)
        assert row[3] == pytest.approx(0.15) and row[4] == 4 and row[5] == 18 and row[6] == 10  # all paid, kept


# -- tens of thousands of rows ----------------------------------------------------------------------------

def test_fifty_thousand_calls(tmp_path):
    n = 50_000
    with Ledger(tmp_path / "big.sqlite") as led:
        t0 = time.perf_counter()
        with led.transaction():
            for i in range(n):
                led.record(f"k{i}", model="gpt" if i % 2 else "claude", stage="generate", request={"i": i},
                           response={"i": i} if i % 10 else None, status="ok" if i % 10 else "error",
                           reason=None if i % 10 else ("timeout" if i % 20 else "not_a_label"),
                           latency_s=(i % 100) / 100, cost_usd=1e-5, tokens_in=20, tokens_out=2)
        t_insert = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = led.lookup(f"k{i}" for i in range(n))
        t_lookup = time.perf_counter() - t0
        t0 = time.perf_counter()
        st = {r["model"]: r for r in led.stats()}
        t_stats = time.perf_counter() - t0
        assert len(got) == n - n // 10
        assert led.db.execute("SELECT sum(hits) FROM calls").fetchone()[0] == n - n // 10
        assert st["gpt"]["calls"] == n // 2 and st["gpt"]["failed"] == 0
        assert st["claude"]["failures"] == {"timeout": n // 20, "not_a_label": n // 20}
        lat = [(i % 100) / 100 for i in range(0, n, 2) if i % 10]
        assert st["claude"]["latency_p50_s"] == pytest.approx(np.quantile(lat, 0.5))
        assert st["claude"]["latency_p95_s"] == pytest.approx(np.quantile(lat, 0.95))
        assert led.spent() == pytest.approx(n * 1e-5) and led.tokens_used() == 22 * n
    # generous bounds for a busy 2-core box; what matters is no per-row transaction (that is ~100x slower)
    assert t_insert < 30 and t_lookup < 15 and t_stats < 15, (t_insert, t_lookup, t_stats)


# -- merging ledgers from several machines -------------------------------------------------------------

def test_merge_keeps_successes_is_idempotent_and_does_not_double_count(tmp_path):
    a, b = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    with Ledger(a) as la:
        _rec(la, "only-a", cost=1.0)
        _rec(la, "both-ok", cost=2.0, latency_s=0.1)
        _rec(la, "err-in-a", status="error", cost=0.1, reason="timeout")
        run = la.start_run("generate", "m", 3, 0)
        la.finish_run(run, "done", calls=3, failed=1, usd=3.1)
    time.sleep(0.01)
    with Ledger(b) as lb:
        _rec(lb, "only-b", cost=4.0)
        _rec(lb, "both-ok", cost=2.0, latency_s=0.9)  # the same call, recorded later on another machine
        _rec(lb, "err-in-a", cost=0.5, latency_s=0.3)
    dest = tmp_path / "merged.sqlite"
    with Ledger(dest) as m:
        r1 = m.merge(a)
        r2 = m.merge(b)
        r3 = m.merge(b)  # again: nothing changes
        assert (r1["added"], r2["added"], r3["added"]) == (3, 1, 0)
        assert r2["now_ok"] == 1 and r3["now_ok"] == 0
        rows = {k: (s, c, lat) for k, s, c, lat in m.db.execute("SELECT key, status, cost_usd, latency_s FROM calls")}
        assert rows["err-in-a"][0] == "ok" and rows["err-in-a"][2] == 0.3  # the success from b wins
        assert rows["both-ok"][2] == 0.1  # of two successes, the earlier one stays
        assert m.spent() == pytest.approx(1.0 + 2.0 + 0.5 + 4.0)  # max per key: not paid twice
        assert m.lookup(["only-a", "only-b", "both-ok", "err-in-a"]).keys() == {"only-a", "only-b", "both-ok", "err-in-a"}
        assert len(m.runs()) == 1
        with pytest.raises(ValueError, match="into itself"):
            m.merge(dest)
        with pytest.raises(FileNotFoundError):
            m.merge(tmp_path / "missing.sqlite")


# -- the budget gate under concurrency -------------------------------------------------------------------

def test_budget_gate_counts_calls_in_flight(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as led:
        _rec(led, "old", cost=0.4)
        g = BudgetGate(led, 1.0, None)
        assert g.reserve(0.25, 0) and g.reserve(0.25, 0)  # 0.4 spent + 0.5 in flight
        assert not g.reserve(0.2, 0)  # would pass 1.0 if both in-flight calls cost what was estimated
        g.release(0.25, 0)
        g.charge(Answer(label="x", cost_usd=0.05))  # it cost less than estimated
        assert g.reserve(0.2, 0)  # 0.45 spent + 0.25 + 0.2 in flight
        assert "budget $1.0000 reached" in g.refusal(0.7, 0)
        t = BudgetGate(led, None, 100)
        assert t.reserve(60, 60) and not t.reserve(0, 41) and t.reserve(0, 40)  # no $ cap: only tokens count


class InstantAsyncTeacher(Teacher):
    """An async teacher that answers at once: measures protege's own per-call overhead."""

    name = "instant"

    def request(self, text, sample=0):
        return {"text": text, "sample": sample}

    def estimate_cost(self, request):
        return 1e-6

    async def acall(self, req, reserve=None):
        await asyncio.sleep(0)
        return Answer(label=self.task.labels[len(req["text"]) % 3], probs=[1.0, 0.0, 0.0], soft="hard",
                      cost_usd=1e-6, latency_s=0.001, extra={"requests": 1})

    def answer(self, requests):
        async def all_():
            return [await self.acall(r) for r in requests]

        return asyncio.run(all_())

    def run(self, coro):  # what label_with_ledger drives an async teacher with
        return asyncio.run(coro)


def test_ten_thousand_items_through_the_pipeline(tmp_path):
    task = parse_task(deep_merge(base_task(), {"teacher": {"backend": "openai", "model": "instant", "concurrency": 32}}))
    texts = [f"item {i}" for i in range(10_000)]
    with Ledger(tmp_path / "l.sqlite") as led:
        t0 = time.perf_counter()
        out, s1 = label_with_ledger(InstantAsyncTeacher(task), texts, led, stage="generate")
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out2, s2 = label_with_ledger(InstantAsyncTeacher(task), texts, led, stage="generate")
        t_again = time.perf_counter() - t0
        assert led.count("ok") == 10_000 and led.spent() == pytest.approx(0.01)
        run = led.runs(2)
    assert s1["calls"] == 10_000 and s2["calls"] == 0 and s2["cache_hits"] == 10_000
    assert [o[0].label for o in out] == [o[0].label for o in out2]
    assert [r["status"] for r in run] == ["done", "done"] and run[1]["calls"] == 10_000
    assert t_first < 60 and t_again < 20, (t_first, t_again)  # ~1 ms / ~0.2 ms per item on a busy 2-core box
    with Ledger(tmp_path / "l.sqlite") as led, pytest.raises(BudgetExceeded, match="stopped cleanly after 0 new calls"):
        label_with_ledger(InstantAsyncTeacher(task), texts + ["one more"], led, stage="generate", budget_usd=0.01)


def test_redistill_folds_a_candidate_ledger_with_the_one_merge(tmp_path):
    """redistill used its own INSERT OR IGNORE, so a failure in the run's ledger shadowed the candidate's later
    success for the same request; it now goes through Ledger.merge."""
    from protege.serve.redistill import fold_ledger

    run, cand = tmp_path / "run.sqlite", tmp_path / "cand.sqlite"
    with Ledger(run) as lr:
        _rec(lr, "k", status="error", cost=0.1, reason="timeout")
    with Ledger(cand) as lc:
        _rec(lc, "k", cost=0.5)
        _rec(lc, "new", cost=1.0)
    fold_ledger(cand, run)
    with Ledger(run) as lr:
        rows = dict(lr.db.execute("SELECT key, status FROM calls"))
    assert rows == {"k": "ok", "new": "ok"}
    fold_ledger(cand, tmp_path / "fresh.sqlite")  # no run ledger yet: a copy
    assert (tmp_path / "fresh.sqlite").is_file()

"""The call ledger: cache, retries of failures, cost, budget, migrations, crash safety."""

from __future__ import annotations

import sqlite3

import pytest

from protege.stages.generate import label_with_ledger
from protege.teachers.ledger import MIGRATIONS, BudgetExceeded, Ledger, request_key
from protege.task import parse_task
from protege.teachers.base import Answer, Teacher
from tiny import base_task, deep_merge


@pytest.fixture
def ledger(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as led:
        yield led


def _rec(led, key, status="ok", cost=0.0, response=None, **kw):
    led.record(key, model="m", stage="generate", request={"q": key}, response=response if status == "ok" else None,
               status=status, error=None if status == "ok" else "boom", cost_usd=cost, **kw)


# -- keys --------------------------------------------------------------------------------------

def test_request_key_stable_and_order_independent():
    a = request_key("gpt", {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "n": 1})
    b = request_key("gpt", {"n": 1, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]})
    assert a == b
    assert a == request_key("gpt", {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "n": 1}, 0)
    assert len(a) == 64 and int(a, 16) >= 0
    # pinned: a change to the hashing would silently orphan every user's paid-for ledger
    assert request_key("m", {"x": 1}, 0) == "f7d32c120559c49fe796c61c877fc8c75f00c6a890f549bbd30d21b4496e70f0"


def test_request_key_sensitive_to_sample_model_and_request():
    base = request_key("gpt", {"p": "x"}, 0)
    assert request_key("gpt", {"p": "x"}, 1) != base
    assert request_key("gpt", {"p": "x"}, 2) != request_key("gpt", {"p": "x"}, 1)
    assert request_key("gpt2", {"p": "x"}, 0) != base
    assert request_key("gpt", {"p": "y"}, 0) != base
    assert request_key("gpt", {"p": "x", "t": 0.0}, 0) != base


# -- record / lookup -----------------------------------------------------------------------------

def test_record_then_lookup(ledger):
    _rec(ledger, "k1", response={"label": "a", "probs": [0.9, 0.1]}, tokens_in=10, tokens_out=1, latency_s=0.2)
    got = ledger.lookup(["k1", "k2"])
    assert got == {"k1": {"label": "a", "probs": [0.9, 0.1]}}
    row = ledger.db.execute("SELECT tokens_in, tokens_out, latency_s, hits, status FROM calls WHERE key='k1'").fetchone()
    assert row == (10, 1, 0.2, 1, "ok")
    assert ledger.count() == 1 and ledger.count("ok") == 1


def test_lookup_many_keys_chunks(ledger):
    for i in range(1203):
        _rec(ledger, f"k{i}", response={"i": i})
    got = ledger.lookup([f"k{i}" for i in range(0, 1300)])
    assert len(got) == 1203 and got["k1202"] == {"i": 1202}


def test_failed_call_is_not_served_and_success_replaces_it(ledger):
    _rec(ledger, "k", status="error", cost=0.01)
    assert ledger.lookup(["k"]) == {}
    assert ledger.count("error") == 1
    _rec(ledger, "k", response={"label": "b"}, cost=0.02)
    assert ledger.lookup(["k"]) == {"k": {"label": "b"}}
    row = ledger.db.execute("SELECT status, error, attempts, cost_usd FROM calls WHERE key='k'").fetchone()
    assert row[0] == "ok" and row[1] is None and row[2] == 2
    assert row[3] == pytest.approx(0.03)  # money paid for the failed attempt is not forgotten
    assert ledger.count() == 1


def test_cost_accumulates_and_spent_per_model(ledger):
    _rec(ledger, "a", response={}, cost=0.25)
    _rec(ledger, "b", response={}, cost=0.5)
    ledger.record("c", model="other", stage="gold", request={}, response={}, cost_usd=1.0)
    assert ledger.spent() == pytest.approx(1.75)
    assert ledger.spent("m") == pytest.approx(0.75)
    assert ledger.spent("other") == pytest.approx(1.0)
    s = {(r["model"], r["stage"]): r for r in ledger.summary()}
    assert s[("m", "generate")]["calls"] == 2 and s[("m", "generate")]["cost_usd"] == pytest.approx(0.75)


def test_latencies_only_successful(ledger):
    _rec(ledger, "a", response={}, latency_s=0.1)
    _rec(ledger, "b", status="error", latency_s=9.0)
    assert ledger.latencies("m") == [0.1]
    assert ledger.latencies("m", stage="gold") == []


def test_budget_check(ledger):
    ledger.check_budget(None, 1e9)  # no budget: never raises
    _rec(ledger, "a", response={}, cost=0.9)
    ledger.check_budget(1.0, 0.1)  # exactly at the cap is allowed
    with pytest.raises(BudgetExceeded, match=r"budget \$1.0000 reached: spent \$0.9000"):
        ledger.check_budget(1.0, 0.11)


# -- schema ------------------------------------------------------------------------------------

def test_migrations_numbered_and_idempotent(tmp_path):
    p = tmp_path / "l.sqlite"
    with Ledger(p) as a:
        _rec(a, "k", response={"x": 1})
    with Ledger(p) as b:  # open again: no migration re-applied, data kept
        versions = [r[0] for r in b.db.execute("SELECT version FROM schema_version ORDER BY version")]
        assert versions == list(range(1, len(MIGRATIONS) + 1))
        assert b.lookup(["k"]) == {"k": {"x": 1}}
    with Ledger(p) as c:
        assert c.db.execute("SELECT count(*) FROM schema_version").fetchone()[0] == len(MIGRATIONS)


def test_new_migration_applies_on_top(tmp_path, monkeypatch):
    p = tmp_path / "l.sqlite"
    Ledger(p).close()
    monkeypatch.setattr("protege.teachers.ledger.MIGRATIONS", MIGRATIONS + ["ALTER TABLE calls ADD COLUMN note TEXT"])
    with Ledger(p) as led:
        cols = [r[1] for r in led.db.execute("PRAGMA table_info(calls)")]
        assert "note" in cols
        assert [r[0] for r in led.db.execute("SELECT version FROM schema_version")] == list(range(1, len(MIGRATIONS) + 2))


def test_wal_mode(tmp_path):
    p = tmp_path / "l.sqlite"
    with Ledger(p) as led:
        assert led.db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    raw = sqlite3.connect(p)  # persisted in the file, not just this connection
    assert raw.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    raw.close()


def test_each_record_is_committed_immediately(tmp_path):
    """A second connection sees a call as soon as record() returns: a kill -9 loses nothing recorded."""
    p = tmp_path / "l.sqlite"
    led = Ledger(p)
    _rec(led, "k", response={"x": 1})
    other = sqlite3.connect(p)
    assert other.execute("SELECT count(*) FROM calls WHERE status='ok'").fetchone()[0] == 1
    other.close()
    led.close()


# -- label_with_ledger: the ledger in use ----------------------------------------------------------

class FakeTeacher(Teacher):
    """Answers from a lookup; counts what was actually sent; can fail chosen texts or cost money."""

    def __init__(self, task, cost=0.0, fail=()):
        super().__init__(task)
        self.name = "fake"
        self.cost, self.fail, self.sent = cost, set(fail), []

    def request(self, text, sample=0):
        return {"text": text}

    def estimate_cost(self, request):
        return self.cost

    def answer(self, requests):
        self.sent += [r["text"] for r in requests]
        out = []
        for r in requests:
            if r["text"] in self.fail:
                out.append(Answer(label=None, status="error", error="HTTP 500", cost_usd=0.0))
            else:
                lab = self.task.labels[len(r["text"]) % len(self.task.labels)]
                out.append(Answer(label=lab, probs=[float(x == lab) for x in self.task.labels], soft="hard",
                                  cost_usd=self.cost, latency_s=0.01))
        return out


def _task(**teacher):
    return parse_task(deep_merge(base_task(), {"teacher": {"backend": "openai", "model": "fake", **teacher}}))


def test_second_pass_is_served_from_ledger(ledger):
    t = FakeTeacher(_task(), cost=0.001)
    texts = [f"text {i}" for i in range(7)]
    out1, s1 = label_with_ledger(t, texts, ledger, stage="generate", samples=2)
    assert s1["calls"] == 14 and s1["cache_hits"] == 0 and len(t.sent) == 14
    assert ledger.spent() == pytest.approx(0.014)
    t2 = FakeTeacher(_task(), cost=0.001)
    out2, s2 = label_with_ledger(t2, texts, ledger, stage="generate", samples=2)
    assert t2.sent == [] and s2["calls"] == 0 and s2["cache_hits"] == 14
    assert [[a.label for a in item] for item in out1] == [[a.label for a in item] for item in out2]
    assert ledger.spent() == pytest.approx(0.014)  # no new cost


def test_failed_calls_are_retried_next_run(ledger):
    texts = ["a", "bb", "ccc"]
    t = FakeTeacher(_task(), fail={"bb"})
    out, s = label_with_ledger(t, texts, ledger, stage="generate")
    assert s["failed"] == 1 and out[1][0].status == "error"
    t2 = FakeTeacher(_task())
    out2, s2 = label_with_ledger(t2, texts, ledger, stage="generate")
    assert t2.sent == ["bb"] and s2["cache_hits"] == 2
    assert out2[1][0].status == "ok"
    assert ledger.count("ok") == 3 and ledger.count() == 3


def test_budget_is_checked_before_a_call_is_sent(ledger):
    t = FakeTeacher(_task(batch_size=1, concurrency=1), cost=0.4)
    texts = [f"t{i}" for i in range(5)]
    with pytest.raises(BudgetExceeded):
        label_with_ledger(t, texts, ledger, stage="generate", budget_usd=1.0)
    # concurrency=1 → batches of 2: 0.8 spent, the next batch (0.8 more) is refused before it is sent
    assert len(t.sent) == 2
    assert ledger.spent() == pytest.approx(0.8)
    # nothing already paid for is repaid on resume; the budget still holds
    t2 = FakeTeacher(_task(batch_size=1, concurrency=1), cost=0.4)
    with pytest.raises(BudgetExceeded):
        label_with_ledger(t2, texts, ledger, stage="generate", budget_usd=1.0)
    assert t2.sent == []


def test_budget_of_zero_sends_nothing(ledger):
    t = FakeTeacher(_task(), cost=0.001)
    with pytest.raises(BudgetExceeded):
        label_with_ledger(t, ["x"], ledger, stage="generate", budget_usd=0.0)
    assert t.sent == [] and ledger.count() == 0

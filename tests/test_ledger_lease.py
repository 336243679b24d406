"""Several processes on one ledger: a request is claimed (a lease row, taken in a transaction) before it is
sent, so two unsharded ``protege generate`` runs on the same ``--out`` never pay for one input twice.

Counted on the server side (tests/fault_server.py logs every HTTP request per item): nothing is mocked
between protege and the socket, and the two runs are real OS processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from fault_server import create_fault_app, serve
from protege import progress
from protege.stages.generate import label_with_ledger
from protege.teachers.ledger import Ledger, request_key
from protege.task import parse_task
from protege.registry import make_teacher

KEY_ENV = "PROTEGE_FAULT_KEY"
LABELS = ["sports", "business", "tech"]
FAST = {"timeout_s": 2.0, "retry_base_s": 0.01, "retry_max_s": 0.05, "max_retries": 3, "max_tokens": 8,
        "concurrency": 4, "top_logprobs": 5, "price_in_per_1m": 1.0, "price_out_per_1m": 2.0}


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-fault")
    monkeypatch.setitem(progress.QUIET, "on", True)


@pytest.fixture(scope="module")
def server():
    app = create_fault_app(latency_s=0.03)
    url, stop = serve(app)
    yield url, app.state.s
    stop()


def raw_task(url: str, **teacher) -> dict:
    return {"name": "leases", "kind": "classify", "instruction": "What is the topic of the news article?",
            "labels": LABELS, "data": {"inputs": "inputs.jsonl", "gold": "gold.jsonl"},
            "teacher": {"backend": "openai", "model": "fault-model", "base_url": url, "api_key_env": KEY_ENV,
                        **FAST, **teacher}}


def write_task_dir(root: Path, url: str, inputs: list[str], gold: list[str], **teacher) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "inputs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in inputs))
    (root / "gold.jsonl").write_text("".join(json.dumps({"text": t, "label": "tech"}) + "\n" for t in gold))
    p = root / "task.yaml"
    p.write_text(yaml.safe_dump(raw_task(url, **teacher), sort_keys=False))
    return p


def test_two_unsharded_processes_on_one_out_send_each_request_once(tmp_path, server):
    url, state = server
    n = 160
    inputs = [f"two{i} [label={LABELS[i % 3]}]" for i in range(n)]
    gold = [f"twog{i} [label=tech]" for i in range(8)]
    ours = set(inputs) | set(gold)
    p = write_task_dir(tmp_path / "t", url, inputs, gold)
    out = tmp_path / "run"
    env = {**os.environ, KEY_ENV: "sk-fault", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "protege.cli", "generate", str(p), "--out", str(out)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [pr.communicate(timeout=300) for pr in procs]
    for pr, (o, e) in zip(procs, outs):
        assert pr.returncode == 0, (o + e)[-3000:]
    per_item = Counter(e["item"] for e in state.log if e["item"] in ours)
    twice = {k: v for k, v in per_item.items() if v > 1}
    assert twice == {}, f"{len(twice)} of {len(per_item)} inputs were sent more than once"
    assert set(per_item) == ours
    with Ledger(out / "ledger.sqlite") as led:
        assert led.count("ok") == led.count() == n + len(gold)
        assert led.db.execute("SELECT sum(requests) FROM calls").fetchone()[0] == n + len(gold)
        assert led.db.execute("SELECT count(*) FROM leases").fetchone()[0] == 0  # every lease given back
    rows = [json.loads(x) for x in (out / "generate" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == n and all(r["status"] == "ok" for r in rows)


def _put_lease(led: Ledger, key: str, *, expires_in: float, host: str = "another-machine", pid: int = 1) -> None:
    now = time.time()
    led.db.execute("INSERT INTO leases (key, owner, pid, host, taken_at, expires_at) VALUES (?,?,?,?,?,?)",
                   (key, f"owner-{key[:6]}", pid, host, now, now + expires_in))


def test_expired_lease_is_taken_over_live_one_is_waited_for(tmp_path, server):
    url, state = server
    task = parse_task(raw_task(url))
    teacher = make_teacher(task)
    texts = ["exp0 [label=tech]", "exp1 [label=sports]", "exp2 [label=business]", "exp3 [label=tech]"]
    keys = [request_key(teacher.name, teacher.request(t, 0), 0) for t in texts]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: a process on this machine killed mid-call
    with Ledger(tmp_path / "l.sqlite") as led:
        _put_lease(led, keys[0], expires_in=-5)                       # expired (a killed process elsewhere)
        _put_lease(led, keys[1], expires_in=1.0)                      # live, held by another machine
        _put_lease(led, keys[2], expires_in=3600, host=socket.gethostname(), pid=dead.pid)  # dead owner here
        t0 = time.monotonic()
        out, stats = label_with_ledger(teacher, texts, led, stage="generate")
        wall = time.monotonic() - t0
        assert [o[0].status for o in out] == ["ok"] * 4
        assert led.db.execute("SELECT count(*) FROM leases").fetchone()[0] == 0
    teacher.close()
    log = [e for e in state.log if e["item"] in texts]
    assert Counter(e["item"] for e in log) == Counter(texts)  # each sent once, the held one only after its lease
    assert wall >= 0.9, "the live lease of another process was not waited for"
    # taken over: the expired one and the dead pid's at once, the live one when it expired unreturned
    assert stats["calls"] == 4 and stats["leases_taken_over"] == 3


def test_a_lease_whose_owner_answered_meanwhile_is_read_not_resent(tmp_path, server):
    url, state = server
    task = parse_task(raw_task(url))
    teacher = make_teacher(task)
    texts = ["done0 [label=tech]", "done1 [label=sports]"]
    keys = [request_key(teacher.name, teacher.request(t, 0), 0) for t in texts]
    with Ledger(tmp_path / "l.sqlite") as led:
        _put_lease(led, keys[0], expires_in=30)
        mark = len(state.log)

        import threading

        def other_process_answers():  # the lease holder records its answer and gives the lease back
            time.sleep(0.5)
            with Ledger(tmp_path / "l.sqlite") as other, other.transaction():
                other.record(keys[0], model=teacher.name, stage="generate", request={"x": 1},
                             response={"label": "tech", "probs": [0, 0, 1], "soft": "hard", "text": "tech"})
                other.db.execute("DELETE FROM leases WHERE key = ?", (keys[0],))

        th = threading.Thread(target=other_process_answers)
        th.start()
        out, stats = label_with_ledger(teacher, texts, led, stage="generate")
        th.join()
    teacher.close()
    assert [o[0].label for o in out] == ["tech", "sports"]
    assert [e["item"] for e in state.log[mark:]] == [texts[1]]  # only the unclaimed one went out
    assert stats["calls"] == 1 and stats["cache_hits"] == 1 and stats["answered_elsewhere"] == 1

"""A teacher that cannot be reached stops ``generate`` (and ``run``) with exit 2 and says so, rather than
recording every call as failed and letting ``train`` blame the data."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from protege import progress

KEY_ENV = "PROTEGE_FAULT_KEY"


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-none")
    monkeypatch.setitem(progress.QUIET, "on", True)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now: connect() is refused
    return port


def write_task(root: Path, url: str, n: int = 60) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "inputs.jsonl").write_text("".join(json.dumps({"text": f"article {i} about things"}) + "\n"
                                               for i in range(n)))
    (root / "gold.jsonl").write_text("".join(json.dumps({"text": f"gold {i}", "label": "tech"}) + "\n"
                                             for i in range(6)))
    task = {"name": "down", "kind": "classify", "instruction": "Topic?", "labels": ["sports", "business", "tech"],
            "data": {"inputs": "inputs.jsonl", "gold": "gold.jsonl"},
            "teacher": {"backend": "openai", "model": "gpt-4o-mini", "base_url": url, "api_key_env": KEY_ENV,
                        "max_retries": 3, "retry_base_s": 0.05, "retry_max_s": 0.2, "concurrency": 4}}
    p = root / "task.yaml"
    p.write_text(yaml.safe_dump(task, sort_keys=False))
    return p


@pytest.mark.parametrize("command", ["generate", "run"])
def test_unreachable_teacher_stops_generate_with_exit_2_and_says_so(tmp_path, command):
    from protege.cli import app
    from protege.teachers.ledger import Ledger

    url = f"http://127.0.0.1:{closed_port()}/v1"
    p = write_task(tmp_path / "t", url)
    out = tmp_path / "run"
    t0 = time.monotonic()
    r = CliRunner().invoke(app, [command, str(p), "--out", str(out)], env={"COLUMNS": "300"})
    wall = time.monotonic() - t0
    said = " ".join(r.output.split())
    assert r.exit_code == 2, r.output
    assert f"teacher unreachable at {url} (connection refused)" in said, said
    assert "check teacher.base_url" in said
    assert "usable items" not in said  # not blamed on the data
    assert not (out / "generate").exists()
    with Ledger(out / "ledger.sqlite") as led:
        sent = led.count()
        assert led.count("ok") == 0
    assert sent < 60, f"stopped only after {sent} of 60 calls: not early"
    assert wall < 60

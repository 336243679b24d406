"""``protege serve`` against hostile input and hostile clients, over real HTTP on 127.0.0.1 (issue 12).

Deeply nested JSON, lone surrogates and odd content parts get a 400 in the OpenAI error shape (never a
plain 500); a body that is not ``application/json`` gets 415; a client that stops sending its body gets 408;
a big batch runs off the event loop (``/healthz`` answers while it is in flight); the static student's word
cache is bounded; the review queue keeps one item per text; the shadow queue is bounded (drops counted in
``/metrics``) and a SIGTERM stops the gateway in seconds even with a backlog of shadow calls.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_gateway import KEY, LABELS, Served, gateway, train_static, world  # noqa: F401  (world: a fixture)

from protege.serve.gateway import GatewayConfig, create_app
from tiny import synthetic_rows, write_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")
H = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}


@pytest.fixture(scope="module")
def big(world):  # noqa: F811
    g = gateway(world, "serve-hostile", max_request_bytes=1_000_000)
    yield g
    g.stop()


def _is_openai_400(r: httpx.Response) -> str:
    assert r.status_code == 400, (r.status_code, r.text[:200])
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and set(err) == {"message", "type", "param", "code"}
    return err["message"]


# -- item 5: bodies that used to give a plain 500 -------------------------------------------------------

@pytest.mark.parametrize("path", ["/chat/completions", "/classify"])
def test_deeply_nested_json_is_400(big, path):
    deep = b"[" * 100_000 + b"]" * 100_000
    assert "nested" in _is_openai_400(httpx.post(big.url + path, content=deep, headers=H))
    inner = b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "extra": ' + b"[" * 5000 \
        + b"]" * 5000 + b"}]}]}"
    _is_openai_400(httpx.post(big.url + path, content=inner, headers=H))


def test_lone_surrogates_are_400_and_valid_pairs_are_fine(big):
    msg = _is_openai_400(httpx.post(f"{big.url}/classify", content=b'{"input": "a \\ud800"}', headers=H))
    assert "surrogate" in msg
    _is_openai_400(httpx.post(f"{big.url}/classify", content=b'{"inputs": ["ok", "b \\udfff c"]}', headers=H))
    chat = b'{"messages": [{"role": "user", "content": "a \\ud800 b"}]}'
    _is_openai_400(httpx.post(f"{big.url}/chat/completions", content=chat, headers=H))
    pair = httpx.post(f"{big.url}/classify", content=b'{"input": "smile \\ud83d\\ude00"}', headers=H)
    assert pair.status_code == 200 and pair.json()["label"] in LABELS


def test_content_parts_that_are_not_text_are_400(big):
    for parts in ([{"type": "text", "text": 5}], [{"type": "text", "text": {"a": 1}}], ["just a string"]):
        body = {"messages": [{"role": "user", "content": parts}]}
        _is_openai_400(httpx.post(f"{big.url}/chat/completions", json=body, headers={"authorization": H["authorization"]}))


def test_the_student_itself_tolerates_lone_surrogates(world):  # noqa: F811
    st = world["student"]
    got = st.predict_proba(["the red \ud800 thing", "\udfff"])
    assert np.allclose(got, st.predict_proba(["the red \ufffd thing", "\ufffd"]))
    assert np.allclose(st.predict_proba(["x \ud83d\ude00"]), st.predict_proba(["x \U0001F600"]))  # a pair: one char


# -- concerns: content type, slow clients ---------------------------------------------------------------

def test_a_body_that_is_not_json_typed_is_415(big):
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        h = {"authorization": H["authorization"], **({"content-type": ctype} if ctype else {})}
        r = httpx.post(f"{big.url}/classify", content=b'{"input": "the red one"}', headers=h)
        assert r.status_code == 415, (ctype, r.status_code)
        assert r.json()["error"]["type"] == "invalid_request_error" and "application/json" in r.json()["error"]["message"]
    ok = httpx.post(f"{big.url}/classify", content=b'{"input": "the red one"}',
                    headers={**H, "content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_a_client_that_stops_sending_its_body_gets_408(world):  # noqa: F811
    task = world["task"]
    settings = task.serve.model_copy(update={"shadow_fraction": 0.0, "rate_limit_per_minute": None})
    g = Served(create_app(GatewayConfig(task, world["run"], serve=settings, api_keys=[KEY], read_timeout_s=1.0,
                                        data_dir=world["root"] / "serve-slow")))
    try:
        host, port = g.url.removeprefix("http://").removesuffix("/v1").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(f"POST /v1/classify HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n"
                      f"content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"input\":".encode())
            reply = s.recv(4096)  # then nothing more: the gateway must not wait for ever
        assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
    finally:
        g.stop()


# -- item 6: big batches off the event loop, a bounded word cache ------------------------------------------

class Gate:
    """A classifier predictor that holds every batch of more than one input until released."""

    def __init__(self, inner):
        self.inner, self.is_lm, self.labels = inner, False, inner.labels
        self.entered, self.release = threading.Event(), threading.Event()

    def predict(self, texts):
        if len(texts) > 1:
            self.entered.set()
            assert self.release.wait(60)
        return self.inner.predict(texts)

    def embed(self, texts):
        return self.inner.embed(texts)


def test_healthz_and_small_requests_answer_while_a_big_batch_is_in_flight(world):  # noqa: F811
    from protege.serve.predictor import ClassifierPredictor

    task = world["task"]
    gate = Gate(ClassifierPredictor(world["student"], "gated"))
    settings = task.serve.model_copy(update={"shadow_fraction": 0.0, "rate_limit_per_minute": None,
                                             "escalate": "none", "max_request_bytes": 1_000_000})
    g = Served(create_app(GatewayConfig(task, None, serve=settings, api_keys=[KEY], predictor=gate,
                                        data_dir=world["root"] / "serve-gate")))
    try:
        texts = [f"word{i} " * 30 for i in range(1024)]
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("r", httpx.post(f"{g.url}/classify", json={"inputs": texts},
                                                                            headers=H, timeout=120)))
        t.start()
        assert gate.entered.wait(60)  # the batch is inside the model now, and stays there
        health = httpx.get(g.url.removesuffix("/v1") + "/healthz", timeout=20)
        small = httpx.post(f"{g.url}/classify", json={"input": "the red one"}, headers=H, timeout=20)
        assert health.status_code == 200 and small.status_code == 200
        assert t.is_alive() and "r" not in box  # both answered before the batch did
        gate.release.set()
        t.join(60)
        assert box["r"].status_code == 200 and len(box["r"].json()["results"]) == 1024
    finally:
        gate.release.set()
        g.stop()


def test_word_cache_is_a_bounded_lru(world):  # noqa: F811
    from protege.students.classifier import StaticClassifier

    st = world["student"]
    clf = StaticClassifier(st.base, st.tokenizer, st.labels, word_cache_bytes=200_000)
    rng = np.random.default_rng(0)
    ref = clf.tokenizer
    for i in range(40):
        texts = [" ".join(f"w{rng.integers(1 << 40)}" for _ in range(50)) + " keepme" for _ in range(20)]
        ids = clf._ids(texts)
        assert ids == [ref.encode(t, add_special_tokens=False).ids[: clf.max_tokens] for t in texts]
        assert clf._word_cache.bytes <= 200_000
    assert len(clf._word_cache) < 40 * 20 * 50 / 4  # far fewer entries than distinct words seen
    assert "keepme" in clf._word_cache  # used in every batch: never the least recently used


# -- item 10: one review item per text ------------------------------------------------------------------

def test_the_review_queue_keeps_one_item_per_text(world):  # noqa: F811
    g = gateway(world, "serve-review-dedupe", escalate="review")
    try:
        h = {"authorization": H["authorization"]}
        a = httpx.post(f"{g.url}/classify", json={"input": world["unsure"]}, headers=h).json()
        b = httpx.post(f"{g.url}/classify", json={"input": world["unsure"]}, headers=h).json()
        c = httpx.post(f"{g.url}/classify", json={"inputs": [world["unsure"], world["unsure"] + " !"]}, headers=h).json()
        assert a["answered_by"] == "review" and a["review_id"] == b["review_id"] == c["results"][0]["review_id"]
        assert c["results"][1]["review_id"] != a["review_id"]
        assert [it["text"] for it in g.engine.store.review_items()] == [world["unsure"], world["unsure"] + " !"]
        g.engine.store.answer_review(a["review_id"], "green")
        again = httpx.post(f"{g.url}/classify", json={"input": world["unsure"]}, headers=h).json()
        assert again["review_id"] == a["review_id"]  # answered already: no second item for the same text
        assert len(g.engine.store.review_items(status=None)) == 2
    finally:
        g.stop()


# -- concerns: the shadow queue and shutdown -------------------------------------------------------------

def test_shadow_queue_is_bounded_dropped_calls_are_counted_and_close_is_prompt(world):  # noqa: F811
    g = gateway(world, "serve-shadow-bound", shadow_fraction=1.0, threshold=0.0, max_request_bytes=1_000_000)
    held, started = threading.Event(), []

    def slow_teacher(text, stage):  # a teacher that does not answer until the test lets it
        started.append(text)
        held.wait(60)
        raise RuntimeError("released")

    g.engine.ask_teacher = slow_teacher
    try:
        texts = [r["text"] for r in synthetic_rows(300, start=900)]
        r = httpx.post(f"{g.url}/classify", json={"inputs": texts}, headers=H, timeout=60)
        assert r.status_code == 200
        q = g.engine.shadow
        assert q.pending() <= q.maxsize and q.dropped >= 300 - q.maxsize - q.workers
        metrics = httpx.get(g.url.removesuffix("/v1") + "/metrics", headers=H).text
        line = next(ln for ln in metrics.splitlines() if ln.startswith("protege_shadow_dropped_total"))
        assert float(line.split()[-1]) == q.dropped
        done = threading.Event()
        threading.Thread(target=lambda: (g.stop(), done.set()), daemon=True).start()
        assert done.wait(15), "engine.close() waited on the shadow backlog"
        assert len(started) <= q.workers  # the queued calls were dropped, not worked off
    finally:
        held.set()


def test_escalate_none_turns_shadow_checks_off_unless_asked_for(world):  # noqa: F811
    from protege.serve.cascade import Engine

    task = world["task"]
    base = task.serve.model_copy(update={"rate_limit_per_minute": None})
    off = Engine(GatewayConfig(task, world["run"], serve=type(base).model_validate(
        {**base.model_dump(exclude={"shadow_fraction"}, exclude_unset=True), "escalate": "none"}),
        data_dir=world["root"] / "sh-off"))
    on = Engine(GatewayConfig(task, world["run"], serve=base.model_copy(update={"escalate": "none",
                                                                                "shadow_fraction": 0.2}),
                              data_dir=world["root"] / "sh-on"))
    teacher = Engine(GatewayConfig(task, world["run"], serve=type(base).model_validate({}),
                                   data_dir=world["root"] / "sh-default"))
    try:
        assert off.shadow_fraction == 0.0 and on.shadow_fraction == 0.2
        assert teacher.shadow_fraction == task.serve.shadow_fraction > 0
    finally:
        for e in (off, on, teacher):
            e.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_stops_protege_serve_within_seconds_despite_a_shadow_backlog(tmp_path):
    """A real ``protege serve`` process with ``--escalate none`` and shadow checks asked for, its teacher a
    loopback server answering in 2 s: 300 inputs queue 300 shadow calls (10 minutes of work at 2 in flight).
    SIGTERM must stop it within 10 s (before: it worked the whole backlog off)."""
    here = Path(__file__).parent
    slow = subprocess.Popen([sys.executable, str(here / "fault_server.py"), "--latency", "2"], stdout=subprocess.PIPE,
                            text=True)
    proc = None
    try:
        line = slow.stdout.readline()
        assert line.startswith("PORT "), line
        teacher_url = f"http://127.0.0.1:{int(line.split()[1])}/v1"
        port = _free_port()
        tf = write_task(tmp_path / "task", overrides={
            "teacher": {"backend": "openai", "model": "slow", "base_url": teacher_url, "api_key_env": None,
                        "gguf_file": None, "max_tokens": 4},
            "serve": {"shadow_fraction": 1.0, "rate_limit_per_minute": None, "api_keys_env": None}})
        run = tmp_path / "run"
        train_static(seed=0).save_pretrained(run / "train" / "student")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.Popen([sys.executable, "-c", "from protege.cli import app; app()", "serve", str(tf), "--out", str(run), "--port",
                                 str(port), "--escalate", "none", "--threshold", "0"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
            assert proc.poll() is None, proc.stderr.read()
        texts = [r["text"] for r in synthetic_rows(300, start=2000)]
        r = httpx.post(f"{base}/v1/classify", json={"inputs": texts}, timeout=60)
        assert r.status_code == 200
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        dropped = next(float(ln.split()[-1]) for ln in metrics.splitlines()
                       if ln.startswith("protege_shadow_dropped_total"))
        assert dropped > 0  # shadow checks were asked for (--escalate none keeps an explicit shadow_fraction)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert time.monotonic() - t0 < 10
    finally:
        for p in (proc, slow):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_a_big_batch_is_answered_by_the_worker_process_like_the_student(big, world):  # noqa: F811
    """Over INLINE_CHARS of input, a student served from its folder is run in a worker process (the gateway
    process keeps its GIL for /healthz); the answers are the student's own."""
    from protege.serve.gateway import INLINE_CHARS

    texts = [r["text"] + " " + "filler " * 20 for r in synthetic_rows(200, start=3000)]
    assert sum(map(len, texts)) > INLINE_CHARS
    r = httpx.post(f"{big.url}/classify", json={"inputs": texts}, headers=H, timeout=120)
    assert r.status_code == 200, r.text
    got = [x["label"] for x in r.json()["results"]]
    want = world["student"].predict(texts)
    engine = big.app.state.engine
    assert engine._infer_proc is not None  # the worker process answered
    assert [x["answered_by"] for x in r.json()["results"]].count("student") + \
        [x["answered_by"] for x in r.json()["results"]].count("teacher") == len(texts)
    student_rows = [(g, w) for g, w, x in zip(got, want, r.json()["results"]) if x["answered_by"] == "student"]
    assert student_rows and all(g == w for g, w in student_rows)

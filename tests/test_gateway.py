"""``protege serve``: the OpenAI-compatible gateway over real uvicorn on 127.0.0.1, driven by the ``openai`` SDK.

The served student is a small static classifier trained here (random 16-d table over the MiniLM vocabulary,
fitted on cue-word rows). Its teacher is reached over real HTTP through the ``openai`` backend: a second
protege gateway serving another classifier with ``escalate: none``, which answers with label
``top_logprobs`` — so escalation, capture and shadow checks go through the same client, ledger and
parsing code a user's API teacher does.
"""

from __future__ import annotations

import json
import logging

import httpx
import numpy as np
import openai
import pytest
from typer.testing import CliRunner

from protege.serve.gateway import GatewayConfig, create_app
from protege.serve.local_lm import serve_in_thread
from protege.task import load_task
from tiny import minilm_tokenizer, synthetic_rows, write_task

KEY = "sk-test-secret-0123456789"
LABELS = ["red", "green", "blue"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: extra threads only spin


def train_static(seed: int, n: int = 90):
    from protege.students.classifier import StaticClassifier

    tok = minilm_tokenizer()
    emb = np.random.default_rng(seed).normal(size=(tok.get_vocab_size(), 16)).astype(np.float32)
    st = StaticClassifier(emb, tok, LABELS)
    rows = synthetic_rows(n)
    P = np.eye(3, dtype=np.float32)[[LABELS.index(r["label"]) for r in rows]]
    return st.fit([r["text"] for r in rows], P, seed=seed, dense_weight=1.0)


class Served:
    def __init__(self, app):
        self.app, self.engine = app, app.state.engine
        self.url, self._stop = serve_in_thread(app)

    def stop(self):
        self._stop()
        self.engine.close()

    def requests(self) -> int:
        self.engine.store.flush()
        return self.engine.store.counts()["requests"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A task, a run folder with a trained student + report.json, and a teacher gateway to escalate to."""
    root = tmp_path_factory.mktemp("gw")
    # the teacher: another protege gateway, answering every request itself
    t_task = load_task(write_task(root / "teacher-task"))
    t_run = root / "teacher-run"
    train_static(seed=1).save_pretrained(t_run / "train" / "student")
    teacher = Served(create_app(GatewayConfig(t_task, t_run, serve=t_task.serve.model_copy(
        update={"escalate": "none", "shadow_fraction": 0.0, "rate_limit_per_minute": None}), api_keys=[])))
    task_file = write_task(root / "task", overrides={"teacher": {
        "backend": "openai", "model": "protege-teacher", "base_url": teacher.url, "api_key_env": None,
        "gguf_file": None, "price_in_per_1m": 1.0, "price_out_per_1m": 2.0, "top_logprobs": 3, "max_tokens": 4}})
    task = load_task(task_file)
    run = root / "run"
    student = train_static(seed=0)
    student.save_pretrained(run / "train" / "student")
    (run / "curate").mkdir(parents=True)
    (run / "curate" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(90)))
    texts = [r["text"] for r in synthetic_rows(30, start=500)] + ["qwxz vbnm", "zzyzx plugh xyzzy", "a b c", "??"]
    conf = student.predict_proba(texts).max(1)
    order = np.argsort(conf)
    unsure, sure = texts[order[0]], texts[order[-1]]
    threshold = float((conf[order[0]] + conf[order[-1]]) / 2)
    (run / "report.json").write_text(json.dumps({
        "task": task.name, "metric": "accuracy", "n_eval": 15, "student": {"score": 0.9, "agreement": 0.9},
        "teacher": {"score": 0.9}, "cascade": {"threshold": threshold},
        "cost": {"teacher_usd_per_call": 0.002, "student_usd_per_call": 0.000001}}))
    yield {"task": task, "task_file": task_file, "run": run, "teacher": teacher, "sure": sure, "unsure": unsure,
           "threshold": threshold, "student": student, "root": root}
    teacher.stop()


def gateway(world, data_dir: str, **serve) -> Served:
    task = world["task"]
    settings = task.serve.model_copy(update={"shadow_fraction": 0.0, "max_request_bytes": 4096,
                                             "rate_limit_per_minute": None, **serve})
    return Served(create_app(GatewayConfig(task, world["run"], serve=settings, api_keys=[KEY],
                                           data_dir=world["root"] / data_dir)))


@pytest.fixture(scope="module")
def gw(world):
    g = gateway(world, "serve-cascade")
    yield g
    g.stop()


def client(g: Served, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=g.url, api_key=key, max_retries=0, timeout=30)


def chat(g: Served, text: str, **kw):
    return client(g).chat.completions.create(model="anything", messages=[{"role": "user", "content": text}], **kw)


# -- the OpenAI surface ----------------------------------------------------------------------------

def test_completion_with_the_openai_client(world, gw):
    r = chat(gw, world["sure"], logprobs=True, top_logprobs=3)
    assert r.choices[0].message.content in LABELS
    assert r.model == world["task"].name and r.choices[0].finish_reason == "stop"
    info = r.model_extra["protege"]
    assert info["answered_by"] == "student" and info["threshold"] == pytest.approx(world["threshold"])
    lp = r.choices[0].logprobs.content[0]
    probs = world["student"].predict_proba([world["sure"]])[0]
    assert lp.token == LABELS[int(probs.argmax())]
    assert sorted(np.exp(t.logprob) for t in lp.top_logprobs) == pytest.approx(sorted(probs), abs=1e-5)
    models = client(gw).models.list()
    assert [m.id for m in models.data] == [world["task"].name]


def test_streaming_gives_the_same_answer(world, gw):
    plain = chat(gw, world["sure"]).choices[0].message.content
    chunks = list(chat(gw, world["sure"], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].model_extra["protege"]["answered_by"] == "student"


def test_wrong_or_missing_key_is_401(gw):
    with pytest.raises(openai.AuthenticationError):
        client(gw, key="sk-wrong").chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    r = httpx.post(f"{gw.url}/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.get(gw.url.removesuffix("/v1") + "/healthz").status_code == 200  # health stays open


@pytest.mark.parametrize("body", [b"{not json", b'{"messages": []}', b'{"messages": "hi"}', b'{"model": "m"}',
                                  b'{"messages": [{"role": "system", "content": "no user turn"}]}'])
def test_malformed_body_is_400(gw, body):
    r = httpx.post(f"{gw.url}/chat/completions", content=body,
                   headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_malformed_classify_and_sdk_errors(gw):
    h = {"authorization": f"Bearer {KEY}"}
    assert httpx.post(f"{gw.url}/classify", json={"input": "a", "inputs": ["b"]}, headers=h).status_code == 400
    assert httpx.post(f"{gw.url}/classify", json={"text": "a"}, headers=h).status_code == 400
    with pytest.raises(openai.BadRequestError):
        client(gw).chat.completions.create(model="m", messages=[])


def test_oversize_body_is_413_with_or_without_content_length(gw):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    h = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    assert httpx.post(f"{gw.url}/chat/completions", content=big, headers=h).status_code == 413

    def chunked():  # no Content-Length: the limit is enforced while reading
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    r = httpx.post(f"{gw.url}/chat/completions", content=chunked(), headers=h)
    assert r.status_code == 413
    with pytest.raises(openai.APIStatusError) as e:
        chat(gw, "y" * 5000)
    assert e.value.status_code == 413


def test_rate_limit_is_429_per_key(world):
    g = gateway(world, "serve-rate", rate_limit_per_minute=6)  # a burst of 1, then one every 10 s
    try:
        rs = [httpx.post(f"{g.url}/classify", json={"input": "the lime thing"},
                         headers={"authorization": f"Bearer {KEY}"}) for _ in range(4)]
        assert [r.status_code for r in rs] == [200, 429, 429, 429]
        assert 1 <= int(rs[1].headers["retry-after"]) <= 10 and rs[1].json()["error"]["type"] == "rate_limit_error"
        other = httpx.post(f"{g.url}/classify", json={"input": "x"}, headers={"authorization": "Bearer nope"})
        assert other.status_code == 401  # a wrong key is refused before it can use anyone's quota
    finally:
        g.stop()


def test_keys_come_from_the_environment(world, monkeypatch):
    monkeypatch.setenv("PROTEGE_TEST_KEYS", "k-one, k-two")
    task = world["task"]
    cfg = GatewayConfig(task, world["run"], serve=task.serve.model_copy(update={"api_keys_env": "PROTEGE_TEST_KEYS"}))
    assert cfg.keys() == ["k-one", "k-two"]
    monkeypatch.setenv("PROTEGE_TEST_KEYS", "")
    assert cfg.keys() == []


# -- cascade -------------------------------------------------------------------------------------------

def test_cascade_routes_both_ways_and_escalations_go_through_the_ledger(world, gw):
    from protege.teachers.ledger import Ledger

    assert gw.engine.threshold_source == "report.json (evaluate)"
    before = world["teacher"].requests()
    sure = chat(gw, world["sure"])
    assert sure.model_extra["protege"]["answered_by"] == "student"
    assert world["teacher"].requests() == before  # the teacher was not asked
    unsure = chat(gw, world["unsure"])
    info = unsure.model_extra["protege"]
    assert info["answered_by"] == "teacher" and info["student_confidence"] < world["threshold"]
    t_label = world["teacher"].engine.predictor.predict([world["unsure"]])[0].label
    assert unsure.choices[0].message.content == t_label
    assert world["teacher"].requests() == before + 1
    # the same unsure input again: answered from the ledger, the teacher is not paid twice
    again = httpx.post(f"{gw.url}/classify", json={"input": world["unsure"]},
                       headers={"authorization": f"Bearer {KEY}"}).json()
    assert again["answered_by"] == "teacher" and again["label"] == t_label
    assert world["teacher"].requests() == before + 1
    with Ledger(world["run"] / "ledger.sqlite") as led:
        rows = led.db.execute("SELECT stage, status, hits FROM calls").fetchall()
    assert ("serve", "ok", 1) in rows
    # recorded: the escalated input with the teacher's answer; the student-answered one without its text
    gw.engine.store.flush()
    got = gw.engine.store.query("SELECT answered_by, text, teacher_label FROM requests")
    assert ("teacher", world["unsure"], t_label) in got
    assert all(text is None for who, text, _ in got if who == "student")


def test_metrics_are_prometheus_text(world, gw):
    chat(gw, world["sure"])
    chat(gw, world["unsure"])
    text = httpx.get(gw.url.removesuffix("/v1") + "/metrics", headers={"authorization": f"Bearer {KEY}"}).text
    from prometheus_client.parser import text_string_to_metric_families

    fam = {f.name: f for f in text_string_to_metric_families(text)}
    reqs = {s.labels["answered_by"]: s.value for s in fam["protege_requests"].samples if s.name.endswith("_total")}
    assert reqs["student"] >= 1 and reqs["teacher"] >= 1
    esc = [s for s in fam["protege_escalations"].samples if s.name.endswith("_total")]
    assert esc and esc[0].labels["to"] == "teacher" and esc[0].value >= 1
    hist = [s for s in fam["protege_request_latency_seconds"].samples if s.name.endswith("_count")]
    assert sum(s.value for s in hist) >= 2
    saved = [s for s in fam["protege_saved_usd"].samples if s.name.endswith("_total")][0].value
    assert saved == pytest.approx(reqs["student"] * (0.002 - 0.000001))
    assert [s.value for s in fam["protege_cascade_threshold"].samples] == [pytest.approx(world["threshold"])]
    assert "protege_drift_confidence_psi" in fam and "protege_shadow_agreement" in fam


def test_logs_hold_no_key_and_no_body(world, gw, caplog):
    secret_text = world["unsure"]
    with caplog.at_level(logging.DEBUG):
        chat(gw, secret_text)
        httpx.post(f"{gw.url}/classify", json={"input": secret_text}, headers={"authorization": "Bearer sk-wrong-key"})
    assert any("chat.completions" in r.getMessage() for r in caplog.records)
    assert KEY not in caplog.text and "sk-wrong-key" not in caplog.text and secret_text not in caplog.text


def test_shadow_checks_measure_live_agreement(world):
    g = gateway(world, "serve-shadow", shadow_fraction=1.0, threshold=0.0)
    try:
        texts = [r["text"] for r in synthetic_rows(6, start=700)]
        r = httpx.post(f"{g.url}/classify", json={"inputs": texts}, headers={"authorization": f"Bearer {KEY}"}).json()
        assert {x["answered_by"] for x in r["results"]} == {"student"}
        g.engine.shadow_pool.shutdown(wait=True)
        g.engine.store.flush()
        rows = g.engine.store.query("SELECT text, student_label, teacher_label, agree FROM shadow")
        assert sorted(x[0] for x in rows) == sorted(texts)
        teacher = world["teacher"].engine.predictor
        for text, s_label, t_label, agree in rows:
            assert t_label == teacher.predict([text])[0].label and agree == int(s_label == t_label)
        snap = g.engine.monitor.snapshot()
        assert snap["shadow_n"] == 6 and snap["agreement"] == pytest.approx(np.mean([x[3] for x in rows]))
    finally:
        g.stop()


# -- capture mode and the review queue ----------------------------------------------------------------

def test_capture_mode_proxies_to_the_teacher_and_records_everything(world):
    g = gateway(world, "serve-capture", capture=True)
    try:
        before = world["teacher"].requests()
        texts = [world["sure"], "the heavy brick thing number 9001"]
        answers = [chat(g, t) for t in texts]
        teacher = world["teacher"].engine.predictor
        for t, a in zip(texts, answers):
            assert a.model_extra["protege"]["answered_by"] == "teacher"
            assert a.choices[0].message.content == teacher.predict([t])[0].label
        assert world["teacher"].requests() == before + 2
        g.engine.store.flush()
        rows = g.engine.store.query("SELECT mode, text, teacher_label, teacher_probs, teacher_soft, student_label "
                                    "FROM requests")
        assert len(rows) == 2 and {r[1] for r in rows} == set(texts)
        for mode, text, label, probs, soft, s_label in rows:
            p = json.loads(probs)
            assert mode == "capture" and soft == "logprobs" and label == LABELS[int(np.argmax(p))]
            assert p == pytest.approx([teacher.predict([text])[0].probs[lab] for lab in LABELS], abs=1e-6)
            assert s_label in LABELS  # the student was scored alongside, for free agreement figures
    finally:
        g.stop()


def test_review_round_trip(world):
    from protege.cli import app
    from protege.serve.redistill import collect

    g = gateway(world, "review-run/serve", escalate="review")  # the store where `protege review --out` looks
    try:
        before = world["teacher"].requests()
        r = chat(g, world["unsure"])
        info = r.model_extra["protege"]
        assert info["answered_by"] == "review" and info["review_id"] >= 1
        assert r.choices[0].message.content in LABELS  # the student's provisional answer
        assert world["teacher"].requests() == before
        h = {"authorization": f"Bearer {KEY}"}
        item = httpx.get(f"{g.url}/review/{info['review_id']}", headers=h).json()
        assert item["status"] == "pending" and item["answer"] is None
        # `protege review` lists and answers it (reading the gateway's live SQLite store)
        runner = CliRunner()
        args = ["review", str(world["task_file"]), "--out", str(world["root"] / "review-run")]
        listed = runner.invoke(app, args + ["--queue"], catch_exceptions=False)
        assert listed.exit_code == 0 and "1 pending" in listed.output and world["unsure"][:20] in listed.output
        bad = runner.invoke(app, args + ["--answer", f"{info['review_id']}=purple"])
        assert bad.exit_code != 0 and "not one of the labels" in bad.output
        ok = runner.invoke(app, args + ["--answer", f"{info['review_id']}=green", "--reviewer", "ana"])
        assert ok.exit_code == 0, ok.output
        item = httpx.get(f"{g.url}/review/{info['review_id']}", headers=h).json()
        assert item["status"] == "answered" and item["answer"] == "green"
        assert httpx.get(f"{g.url}/review/999", headers=h).status_code == 404
        # the answer is training data for the next round
        _, human, counts = collect(g.engine.store.path, LABELS)
        assert human == [{"text": world["unsure"], "label": "green"}] and counts["reviewed"] == 1
    finally:
        g.stop()


# -- a causal-LM student: token streaming ---------------------------------------------------------------

def test_causal_lm_student_streams_tokens(world):
    import copy

    from protege.serve.predictor import LMPredictor
    from protege.students.causal_lm import CausalLMStudent
    from tiny import smollm2_tokenizer, tiny_llama

    tok = copy.deepcopy(smollm2_tokenizer())
    student = CausalLMStudent(tiny_llama(len(tok), seed=3), tok, system_prompt="Name the colour.", max_new_tokens=6)
    task = world["task"]
    settings = task.serve.model_copy(update={"escalate": "none", "rate_limit_per_minute": None})
    g = Served(create_app(GatewayConfig(task, None, serve=settings, api_keys=[KEY], data_dir=world["root"] / "lm",
                                        predictor=LMPredictor(student, "tiny-lm", max_tokens=6))))
    try:
        plain = chat(g, "the ocean thing")
        ref = student.tokenizer.decode(student.generate(["the ocean thing"], max_new_tokens=6)[0]["token_ids"],
                                       skip_special_tokens=True)
        assert plain.choices[0].message.content == ref.strip()
        assert plain.usage.completion_tokens >= 1 and plain.usage.prompt_tokens > 10
        chunks = list(chat(g, "the ocean thing", stream=True))
        pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
        assert len(pieces) >= 2 and "".join(pieces).strip() == ref.strip()  # several chunks: token by token
        assert chunks[-1].choices[0].finish_reason == "stop"
    finally:
        g.stop()

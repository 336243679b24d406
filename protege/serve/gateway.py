"""``protege serve``: an OpenAI-compatible gateway in front of the student — ``create_app(config)``.

Endpoints (every one but ``/healthz`` behind the API key when keys are configured):

- ``POST /v1/chat/completions`` — any OpenAI SDK works unchanged; the input is the last user message.
  ``stream=true`` streams server-sent events (token by token for causal-LM students). ``logprobs`` returns
  the label distribution as ``top_logprobs`` for classifier students, so a protege gateway can itself be
  the teacher of another run. Each response carries a ``protege`` object (who answered, confidence,
  threshold, review id) and an ``x-protege-answered-by`` header.
- ``GET /v1/models``; ``POST /v1/classify`` — ``{"input": "..."}`` or ``{"inputs": [...]}`` →
  label, probabilities, confidence, who answered; ``GET /v1/review/{id}`` — a queued item's status and
  the human answer once given.
- ``GET /healthz``; ``GET /metrics`` (Prometheus text).

Request bodies and keys are never logged; one line per request says who answered and how fast. The
decisions live in :mod:`protege.serve.cascade`, the front door (keys, rate, content type, size, slow
bodies) in :mod:`protege.serve.limits`.

Bad input is a 400 in the OpenAI error shape, never a 500: JSON nested past the parser's depth, lone UTF-16
surrogates (``"\\ud800"``: valid JSON, not text), content parts whose ``text`` is not a string. A small
request (up to ``INLINE_CHARS`` of input) is answered on the event loop — a static student takes ~0.1 ms,
less than a thread hop; a bigger one runs on the engine's worker threads, so ``/healthz`` and small
requests are answered while a 1,024-input batch is in flight. Any other error still answers in the
OpenAI shape (500, ``api_error``), without the traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from typing import Any

from fastapi import Request  # module level: FastAPI resolves the endpoints' (string) annotations here
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protege.serve.cascade import Engine, GatewayConfig, Outcome, TeacherUnavailable
from protege.serve.limits import Guard
from protege.serve.local_lm import ChatRequest
from protege.serve.predictor import stream_text

log = logging.getLogger("protege.serve")
INLINE_CHARS = 16_384  # inputs up to this many characters in all are answered on the event loop
_SURROGATE = re.compile("[\ud800-\udfff]")

__all__ = ["create_app", "GatewayConfig"]


class ChatBody(ChatRequest):
    """The OpenAI chat-completions body (local_lm's), except that the model may be omitted (the gateway
    serves one task), sampling defaults to greedy, and streaming is supported."""

    model: str | None = None
    temperature: float = Field(0.0, ge=0, le=2)
    stream: bool = False


class ClassifyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str | None = None
    inputs: list[str] | None = Field(None, min_length=1, max_length=1024)


def _err(status: int, message: str, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status)


def _entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _logprobs(o: Outcome, tok, k: int) -> dict | None:
    if o.tokens and tok is not None and o.answered_by != "teacher":
        return {"content": [{**_entry(tok.decode([t]), lp), "top_logprobs": []} for t, lp in o.tokens]}
    if o.probs and o.label is not None:
        ranked = sorted(o.probs.items(), key=lambda kv: -kv[1])[: max(k, 1)]
        lp = lambda p: math.log(max(p, 1e-45))  # noqa: E731
        return {"content": [{**_entry(o.label, lp(o.probs[o.label])),
                             "top_logprobs": [_entry(lab, lp(p)) for lab, p in ranked] if k else []}]}
    return None


def _text_of(body: ChatBody) -> str:
    """The last user message's text; ValueError for content parts that are not ``{"text": "..."}`` objects."""
    for i in range(len(body.messages) - 1, -1, -1):
        m = body.messages[i]
        if m.role != "user":
            continue
        if not isinstance(m.content, list):
            return m.content or ""
        out = []
        for j, part in enumerate(m.content):
            if part.get("type", "text") != "text":
                continue
            t = part.get("text", "")
            if not isinstance(t, str):
                raise ValueError(f"messages.{i}.content.{j}.text: expected a string, got {type(t).__name__}")
            out.append(t)
        return "".join(out)
    return ""


def _bad_text(texts: list[str]) -> str | None:
    """Why these inputs cannot be answered (None when they can)."""
    for t in texts:
        if not t.isascii() and _SURROGATE.search(t):
            return "invalid request: input text contains a lone UTF-16 surrogate (e.g. '\\ud800'), which is not a character"
    return None


def create_app(config: GatewayConfig):
    """The FastAPI app for ``config`` (also wrapped by the key / size / rate-limit guard)."""
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    from protege.serve.prom import Metrics

    engine = Engine(config)
    metrics = engine.metrics = Metrics(engine)
    s = engine.s
    tok = engine.predictor.tok if engine.predictor is not None and engine.predictor.is_lm else None
    created = int(time.time())

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        yield
        engine.close()

    app = FastAPI(title=f"protege gateway: {engine.model_name}", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine

    def reply_headers(o: Outcome) -> dict:
        return {"x-protege-answered-by": o.answered_by}

    def completion(o: Outcome, body: ChatBody) -> dict:
        lp = _logprobs(o, tok, body.top_logprobs or 0) if body.logprobs else None
        usage = None
        if o.tokens and o.answered_by != "teacher":
            usage = {"prompt_tokens": o.prompt_tokens, "completion_tokens": len(o.tokens) + 1,
                     "total_tokens": o.prompt_tokens + len(o.tokens) + 1}
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": engine.model_name, "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": o.content}, "logprobs": lp,
                             "finish_reason": "stop"}], "usage": usage, "protege": o.info()}

    def chunk(cid: str, delta: dict, finish: str | None = None, extra: dict | None = None) -> str:
        d = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": engine.model_name,
             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if extra:
            d["protege"] = extra
        return f"data: {json.dumps(d)}\n\n"

    def stream_outcome(o: Outcome):
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        yield chunk(cid, {"role": "assistant", "content": ""})
        pieces = stream_text(tok, iter(t for t, _ in o.tokens)) if (o.tokens and tok is not None and
                                                                     o.answered_by != "teacher") else [o.content]
        for piece in pieces:
            yield chunk(cid, {"content": piece})
        yield chunk(cid, {}, "stop", o.info())
        yield "data: [DONE]\n\n"

    def stream_live(text: str, body: ChatBody):
        """Causal-LM student with no cascade to decide: tokens go out as they are decoded."""
        cid, t0, toks = f"chatcmpl-{uuid.uuid4().hex}", time.perf_counter(), []
        p = engine.predictor
        yield chunk(cid, {"role": "assistant", "content": ""})

        def ids():
            for t, lp in p.tokens(text, max_tokens=body.max_completion_tokens or body.max_tokens,
                                  temperature=body.temperature, seed=body.seed):
                toks.append((t, lp))
                yield t

        for piece in stream_text(tok, ids()):
            yield chunk(cid, {"content": piece})
        pred = p.finish(text, toks)
        o = engine.student_outcome(pred)
        engine.monitor.observe(pred.confidence)
        engine.record("chat.completions", text, o, (time.perf_counter() - t0) * 1000)
        yield chunk(cid, {}, "stop", o.info())
        yield "data: [DONE]\n\n"

    def unsure(preds) -> bool:
        # an OOD gate or a next level can escalate a confident answer too: route those off the event loop
        return s.escalate == "teacher" and (engine.ood is not None or len(engine.levels) > 1
                                            or any(x.confidence < engine.threshold for x in preds))

    def predict_and_route(texts: list[str], endpoint: str, preds=None, embs=None):
        """On a worker thread: the student's answers, routed and recorded unless the teacher is needed."""
        preds = preds if preds is not None else engine.predictor.predict(texts)
        return preds, (None if unsure(preds) else engine.answer_many(texts, endpoint, preds, embs))

    async def answer(texts: list[str], endpoint: str, **lm) -> list[Outcome]:
        """A classifier's answer to a small request costs ~0.1 ms: computed on the event loop, no thread
        hop. A big batch goes to the engine's inference threads (numpy and the tokenizer's Rust code do the
        work; the event loop keeps answering). Work that can block — a causal LM decoding, a call to the
        teacher — goes to the thread pool."""
        p = engine.predictor
        if s.capture or p is None or p.is_lm:
            return await run_in_threadpool(engine.answer_many, texts, endpoint, **lm)
        if sum(len(t) for t in texts) > INLINE_CHARS:
            loop, preds, embs = asyncio.get_running_loop(), None, None
            if engine.infer_proc is not None:  # featurised in the worker process: this one keeps its GIL
                P, embs = await asyncio.wrap_future(engine.infer_proc.submit(texts, engine.wants_embedding()))
                preds = p.predictions(P)
            preds, outs = await loop.run_in_executor(engine.infer_pool, predict_and_route, texts, endpoint, preds, embs)
            return outs if outs is not None else await run_in_threadpool(engine.answer_many, texts, endpoint, preds)
        preds = p.predict(texts)
        if unsure(preds):
            return await run_in_threadpool(engine.answer_many, texts, endpoint, preds)
        return engine.answer_many(texts, endpoint, preds)

    async def parse(request: Request, model: type[BaseModel]) -> BaseModel | Response:
        try:
            raw = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            metrics.rejected.labels("invalid").inc()
            return _err(400, f"request body is not valid JSON: {e}")
        except RecursionError:
            metrics.rejected.labels("invalid").inc()
            return _err(400, "request body is JSON nested too deeply")
        try:
            return model.model_validate(raw)
        except ValidationError as e:
            metrics.rejected.labels("invalid").inc()
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "body"
            return _err(400, f"invalid request: {where}: {first['msg']}")

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "model": engine.model_name, "mode": "capture" if s.capture else "cascade",
                "student": None if engine.predictor is None else type(engine.predictor).__name__,
                "threshold": engine.threshold, "threshold_source": engine.threshold_source, "escalate": s.escalate}

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": created,
                                            "owned_by": "protege"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await parse(request, ChatBody)
        if isinstance(body, Response):
            return body
        try:
            text = _text_of(body)
        except ValueError as e:
            metrics.rejected.labels("invalid").inc()
            return _err(400, f"invalid request: {e}")
        bad = _bad_text([text])
        if bad:
            metrics.rejected.labels("invalid").inc()
            return _err(400, bad)
        if not text.strip():
            metrics.rejected.labels("invalid").inc()
            return _err(400, "invalid request: messages: no user message with text content")
        lm = {}
        if engine.predictor is not None and engine.predictor.is_lm:
            lm = {"max_tokens": body.max_completion_tokens or body.max_tokens, "temperature": body.temperature,
                  "seed": body.seed}
            if body.stream and not s.capture and s.escalate == "none":
                return StreamingResponse(stream_live(text, body), media_type="text/event-stream")
        t0 = time.perf_counter()
        try:
            o = (await answer([text], "chat.completions", **lm))[0]
        except TeacherUnavailable as e:
            return _err(502, str(e), "api_error")
        log.info("chat.completions %s conf=%s %.1fms", o.answered_by, _fmt(o.student_confidence),
                 (time.perf_counter() - t0) * 1000)
        if body.stream:
            return StreamingResponse(stream_outcome(o), media_type="text/event-stream", headers=reply_headers(o))
        return JSONResponse(completion(o, body), headers=reply_headers(o))

    @app.post("/v1/classify")
    async def classify(request: Request):
        body = await parse(request, ClassifyBody)
        if isinstance(body, Response):
            return body
        if (body.input is None) == (body.inputs is None):
            metrics.rejected.labels("invalid").inc()
            return _err(400, "invalid request: send exactly one of 'input' (a string) or 'inputs' (a list of strings)")
        texts = [body.input] if body.input is not None else list(body.inputs)
        if any(not t.strip() for t in texts):
            metrics.rejected.labels("invalid").inc()
            return _err(400, "invalid request: empty input text")
        bad = _bad_text(texts)
        if bad:
            metrics.rejected.labels("invalid").inc()
            return _err(400, bad)
        t0 = time.perf_counter()
        try:
            outs = await answer(texts, "classify")
        except TeacherUnavailable as e:
            return _err(502, str(e), "api_error")
        log.info("classify n=%d %s %.1fms", len(texts), ",".join(sorted({o.answered_by for o in outs})),
                 (time.perf_counter() - t0) * 1000)
        res = [{"label": o.label, "content": o.content, "confidence": o.confidence, "probabilities": o.probs,
                "model": engine.model_name, **o.info()} for o in outs]
        return res[0] if body.input is not None else {"results": res}

    @app.get("/v1/review/{item_id}")
    def review_item(item_id: int):
        item = engine.store.review_item(item_id)
        if item is None:
            return _err(404, f"review item {item_id} not found", "not_found_error")
        return {k: item[k] for k in ("id", "status", "answer", "student_label", "student_confidence", "answered_at")}

    @app.exception_handler(Exception)
    async def internal_error(_request, exc: Exception):  # the OpenAI error shape even for a bug; no traceback
        log.error("internal error: %s", type(exc).__name__)
        return _err(500, "The gateway failed to answer this request (internal error).", "api_error")

    guarded = Guard(app, api_keys=config.keys(), max_bytes=s.max_request_bytes, per_minute=s.rate_limit_per_minute,
                    on_reject=lambda reason: metrics.rejected.labels(reason).inc(), read_timeout_s=config.read_timeout_s)
    guarded.state = app.state  # tests and the CLI reach the engine as app.state.engine either way
    return guarded


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}"

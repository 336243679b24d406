"""A fault-injecting OpenAI-compatible chat-completions server, for tests and benchmarks (127.0.0.1 only).

It answers like a hosted model whose behaviour per input is written into the input itself, so a test
states its faults next to its data. Directives in the *first user message* of a request:

transport faults (evaluated before answering, each with its own per-item counter):
  ``[429xN]``         the first N requests for this item get 429 with ``Retry-After`` (``[429xN@S]``: S seconds)
  ``[500xN]``         the first N get a 500 error
  ``[slowxN]``        the first N sleep ``slow_s`` (longer than the client's timeout) before answering
                      (logged as "slow": the client has hung up)
  ``[dropxN]``        the first N send headers and half a body, then the connection is closed
  ``[badbodyxN]``     the first N get HTTP 200 with a body that is not JSON
content faults (counted only on requests that get an answer):
  ``[offxN]``         the answer is not one of the labels (until the client re-asks N times)
  ``[truncxN]``       the answer is cut by max_tokens (``finish_reason: "length"``)
  ``[jsonbadxN]``     (JSON-schema requests) content that is not valid JSON
  ``[schemabadxN]``   (JSON-schema requests) valid JSON missing a required field
other:
  ``[label=X]``       the answer's label (default: one chosen by a hash of the text)
  ``[noisy]``         with a ``seed``, every third seed answers a different label (self-consistency)
  ``[gen]``           a free-text answer of several tokens (generation), with top-k logprobs per token

``N`` may be ``inf``. Labels are read from the system prompt ("Answer with exactly one of: a, b, c."), so
a shuffled label order is seen as the client sent it. Every request is logged in ``state.log`` (item,
seed, outcome, time) and counted; ``state.max_inflight`` is the most requests in flight at once.
Run as a script (``python tests/fault_server.py --latency 0.05``) it serves in its own process and
prints ``PORT <n>`` when ready.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request  # module level: FastAPI resolves the string annotations here
from fastapi.responses import JSONResponse, Response

_DIRECTIVE = re.compile(r"\[(429|500|slow|drop|badbody|off|trunc|jsonbad|schemabad)x(inf|\d+)(?:@([\d.]+))?\]")
_LABEL = re.compile(r"\[label=([^\]]+)\]")
_LABELS_IN_PROMPT = re.compile(r"Answer with exactly one of: (.+?)\.\s*$", re.S)


@dataclass
class ServerState:
    calls: int = 0                      # every HTTP request to /chat/completions
    answered: int = 0                   # 200 answers with a well-formed body
    inflight: int = 0
    max_inflight: int = 0
    counters: dict = field(default_factory=dict)  # (item, fault) -> times applied
    log: list = field(default_factory=list)       # dicts: item, seed, outcome, t, reask
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok_items(self) -> list[tuple[str, int | None]]:
        """(item, seed) of every request answered with a usable 200."""
        return [(e["item"], e["seed"]) for e in self.log if e["outcome"] == "ok"]


def _user_text(messages: list[dict]) -> str:
    for m in messages:
        if m.get("role") == "user":
            c = m.get("content")
            return c if isinstance(c, str) else "".join(p.get("text", "") for p in c or [])
    return ""


def _labels(messages: list[dict]) -> list[str]:
    sys = next((m.get("content") or "" for m in messages if m.get("role") == "system"), "")
    m = _LABELS_IN_PROMPT.search(sys)
    return [s.strip() for s in m.group(1).split(",")] if m else []


def _h(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def _n_tokens(messages: list[dict]) -> int:
    return sum(len(str(m.get("content") or "").split()) + 4 for m in messages)


def create_fault_app(*, latency_s: float = 0.0, slow_s: float = 2.0, logprobs: str = "on", model: str = "fault-model"):
    """``logprobs``: "on" (top_logprobs answered), "null" (ignored: ``logprobs: null``, as some providers do)
    or "refuse" (400 when logprobs are asked for)."""
    app = FastAPI(title="protege fault server")
    st = ServerState()
    app.state.s = st

    def take(item: str, fault: str, n: float) -> bool:
        """True while this item's ``fault`` has been applied fewer than ``n`` times (then counts it)."""
        with st.lock:
            k = (item, fault)
            used = st.counters.get(k, 0)
            if used < n:
                st.counters[k] = used + 1
                return True
            return False

    def log(item, seed, outcome, reask, body=None):
        body = body or {}
        sys = next((m.get("content") for m in body.get("messages") or [] if m.get("role") == "system"), None)
        with st.lock:
            st.log.append({"item": item, "seed": seed, "outcome": outcome, "t": time.monotonic(), "reask": reask,
                           "system": sys, "response_format": body.get("response_format"),
                           "logprobs": body.get("logprobs"), "max_tokens": body.get("max_tokens")})
            if outcome == "ok":
                st.answered += 1

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "tests"}]}

    @app.get("/stats")
    async def stats():  # for a client in another process (the benchmark): what the server has seen
        return {"calls": st.calls, "answered": st.answered, "max_inflight": st.max_inflight}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        with st.lock:
            st.calls += 1
            st.inflight += 1
            st.max_inflight = max(st.max_inflight, st.inflight)
        try:
            return await _chat(request)
        finally:
            with st.lock:
                st.inflight -= 1

    async def _chat(request: Request):
        body = await request.json()
        messages = body.get("messages") or []
        item = _user_text(messages)
        seed = body.get("seed")
        reask = max(0, len([m for m in messages if m.get("role") == "user"]) - 1)  # tests use no few-shot examples
        faults = {f: (math.inf if n == "inf" else int(n), float(a) if a else None) for f, n, a in _DIRECTIVE.findall(item)}
        if latency_s:
            await asyncio.sleep(latency_s)

        # -- transport faults ------------------------------------------------------------------
        if "429" in faults and take(item, "429", faults["429"][0]):
            wait = faults["429"][1] if faults["429"][1] is not None else 0.05
            log(item, seed, "429", reask, body)
            return JSONResponse({"error": {"message": "Rate limit reached", "type": "rate_limit_error", "code": "rate_limit"}},
                                status_code=429, headers={"Retry-After": f"{wait:g}"})
        if "500" in faults and take(item, "500", faults["500"][0]):
            log(item, seed, "500", reask, body)
            return JSONResponse({"error": {"message": "The server had an error", "type": "server_error"}}, status_code=500)
        late = False
        if "slow" in faults and take(item, "slow", faults["slow"][0]):
            await asyncio.sleep(slow_s)  # past the client's timeout: it has hung up by now
            late = True
        if "drop" in faults and take(item, "drop", faults["drop"][0]):
            log(item, seed, "drop", reask, body)
            return _Dropped()
        if "badbody" in faults and take(item, "badbody", faults["badbody"][0]):
            log(item, seed, "badbody", reask, body)
            return Response('{"id": "chatcmpl-x", "choices": [{"message": {"content": "spo', media_type="application/json")

        wants_lp = bool(body.get("logprobs"))
        if wants_lp and logprobs == "refuse":
            log(item, seed, "400", reask, body)
            return JSONResponse({"error": {"message": "logprobs is not supported for this model", "type":
                                           "invalid_request_error", "param": "logprobs"}}, status_code=400)

        # -- the answer ------------------------------------------------------------------------
        rf = body.get("response_format") or {}
        finish, outcome = "stop", "ok"
        if rf.get("type") == "json_schema":
            tokens, finish, outcome = _json_answer(item, rf, faults, take)
        elif "[gen]" in item:
            tokens = [" The", " quick", " brown", " fox", " jumps", "."]
        else:
            labels = _labels(messages) or ["yes", "no"]
            m = _LABEL.search(item)
            label = m.group(1) if m else sorted(labels)[_h(item) % len(labels)]
            if "[noisy]" in item and seed and seed % 3 == 2:
                others = [lab for lab in sorted(labels) if lab != label]
                label = others[seed % len(others)]
            tokens = [" " + label]
            if "off" in faults and take(item, "off", faults["off"][0]):
                tokens, outcome = [" football"], "off"
            elif "trunc" in faults and take(item, "trunc", faults["trunc"][0]):
                tokens, finish, outcome = [" " + label[: max(1, len(label) // 2)]], "length", "trunc"
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16
        if len(tokens) > max_tokens and rf.get("type") != "json_schema":
            tokens, finish = tokens[:max_tokens], "length"
        content = "".join(tokens).strip()
        lp = None
        if wants_lp and logprobs == "on":
            k = int(body.get("top_logprobs") or 0)
            lp = {"content": [_lp_entry(t, _labels(messages), k, item) for t in tokens]}
        log(item, seed, "slow" if late else outcome, reask, body)
        pt = _n_tokens(messages)
        return {"id": f"chatcmpl-{st.calls}", "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": lp,
                             "finish_reason": finish}],
                "usage": {"prompt_tokens": pt, "completion_tokens": len(tokens), "total_tokens": pt + len(tokens)}}

    return app


def _json_answer(item, rf, faults, take):
    schema = (rf.get("json_schema") or {}).get("schema") or {}
    props = schema.get("properties") or {}
    obj = {}
    for name, p in props.items():
        t = p.get("type")
        obj[name] = 12.5 if t == "number" else 3 if t == "integer" else True if t == "boolean" else f"{name}-{_h(item) % 97}"
    if "jsonbad" in faults and take(item, "jsonbad", faults["jsonbad"][0]):
        return ['{"' + next(iter(props), "x") + '": "unterminated'], "stop", "jsonbad"
    if "schemabad" in faults and take(item, "schemabad", faults["schemabad"][0]):
        req = schema.get("required") or list(props)
        obj.pop(req[0], None)
        return [json.dumps(obj)], "stop", "schemabad"
    return [json.dumps(obj)], "stop", "ok"


def _lp_entry(token: str, labels: list[str], k: int, item: str) -> dict:
    """The chosen token at p=0.7; the other labels (or filler words) share 0.2; a non-label token holds 0.1."""
    alts = [(token, 0.7)]
    others = ([" " + lab for lab in labels if " " + lab != token] if labels
              else [x for x in (" a", " an", " this") if x != token])
    for o in others:
        alts.append((o, 0.2 / len(others)))
    alts.append((" the" if token != " the" else " that", 0.1))
    alts = alts[: max(k, 0)]

    def e(t, p):
        return {"token": t, "logprob": math.log(p), "bytes": list(t.encode())}

    return {**e(token, 0.7), "top_logprobs": [e(t, p) for t, p in alts]}


class _Dropped(Response):
    """An ASGI response that promises 4 KB, sends 40 bytes and closes the connection."""

    def __init__(self) -> None:
        super().__init__(b"")

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")]})
        await send({"type": "http.response.body", "body": b'{"id": "chatcmpl-dropped", "choices": [', "more_body": True})
        raise ConnectionAbortedError("fault server: connection dropped mid-body (on purpose)")


class _QuietDrops(logging.Filter):
    """Keep the deliberate mid-body disconnects out of the test log (uvicorn logs them as errors)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, ConnectionAbortedError) and "on purpose" in str(exc))


logging.getLogger("uvicorn.error").addFilter(_QuietDrops())


def serve(app, port: int = 0):
    """Serve ``app`` on 127.0.0.1 in a daemon thread; return (base_url, stop)."""
    from protege.serve.local_lm import serve_in_thread

    return serve_in_thread(app, port=port)


if __name__ == "__main__":  # a separate process for benchmarks: the server gets its own GIL
    import argparse

    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args()
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    server = uvicorn.Server(uvicorn.Config(create_fault_app(latency_s=a.latency), host="127.0.0.1", port=a.port,
                                           log_level="warning", lifespan="off", backlog=2048))

    def report():
        while not server.started:
            time.sleep(0.01)
        print(f"PORT {server.servers[0].sockets[0].getsockname()[1]}", flush=True)

    threading.Thread(target=report, daemon=True).start()
    server.run()

"""An OpenAI-compatible chat-completions server for a local Hugging Face causal LM.

Why: the ``openai`` teacher backend talks to any OpenAI-compatible URL. Serving a local model behind
that same protocol lets users label with a model on their own machine through the exact code path
they would use with a paid API, and lets the tests exercise that path over real HTTP with a real
model instead of a mock. Generation is a plain token-by-token loop (greedy or seeded sampling) so the
reported ``logprobs`` are exactly the model's ``log_softmax`` at each step, not post-processed scores.

Only what a labelling teacher needs is implemented: non-streaming, ``n=1``, ``GET /v1/models``.
``app.state.calls`` counts chat completions answered, so callers can prove a cache made no calls.
"""

from __future__ import annotations

import hmac
import threading
import time
import uuid
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = ""

    def text(self) -> str:
        """Content as plain text; OpenAI lets it be a list of parts, of which we keep the text ones."""
        if isinstance(self.content, list):
            return "".join(p.get("text", "") for p in self.content if p.get("type", "text") == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    # Unknown OpenAI parameters (top_p, user, ...) are ignored rather than refused, like most local servers.
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    n: int = Field(1, ge=1, le=1)
    stream: bool = Field(False, description="Streaming is not implemented.")


def _error(status: int, message: str, kind: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status)


def _entry(tok, tid: int, logprob: float) -> dict:
    s = tok.decode([tid])  # decode one id, so a leading space (" positive") is kept
    return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}


def create_lm_app(model, tokenizer, model_name: str, logprobs: bool = True, api_key: str | None = None,
                  max_tokens_limit: int = 512):
    """FastAPI app serving ``model`` as ``model_name``.

    ``logprobs=False`` ignores logprob requests and answers ``"logprobs": null``, the way some hosted
    providers do, so the hard-label fallback of a client can be exercised. With ``api_key`` set every
    request must carry ``Authorization: Bearer <api_key>`` (401 otherwise).
    """
    import torch
    from fastapi import FastAPI, Request

    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{model_name}: the tokenizer has no chat template; serve an instruct/chat model")
    app = FastAPI(title=f"protege local LM: {model_name}")
    app.state.calls = 0
    lock = threading.Lock()  # one generation at a time: overlap gains nothing on CPU and costs reproducibility
    stop_ids = {i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))
                if isinstance(i, int) and i != tokenizer.unk_token_id}

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key is not None:
            auth = request.headers.get("authorization", "")
            if not hmac.compare_digest(auth.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "Incorrect or missing API key (send 'Authorization: Bearer <key>').",
                              "invalid_request_error")
        return await call_next(request)

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "protege"}]}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        if req.stream:
            return _error(400, "stream=true is not supported by this server", "invalid_request_error")
        msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        limit = min(req.max_completion_tokens or req.max_tokens or max_tokens_limit, max_tokens_limit)
        want_lp = logprobs and req.logprobs
        k = req.top_logprobs or 0
        gen = torch.Generator()
        if req.seed is not None:
            gen.manual_seed(req.seed)
        else:
            gen.seed()  # unseeded sampling: fresh entropy per request, like a hosted API
        out_ids, lp_content, finish = [], [], "length"
        with lock, torch.no_grad():
            app.state.calls += 1
            past, step_in = None, torch.tensor([ids])
            for _ in range(limit):
                o = model(input_ids=step_in, cache=past, use_cache=True)
                past = o.cache
                lp = torch.log_softmax(o.logits[0, -1].float(), -1)
                if req.temperature == 0:
                    nxt = int(lp.argmax())
                else:
                    nxt = int(torch.multinomial(torch.softmax(lp / req.temperature, -1), 1, generator=gen))
                out_ids.append(nxt)
                if nxt in stop_ids:
                    finish = "stop"
                    break
                if want_lp:
                    top = torch.topk(lp, k) if k else None
                    e = _entry(tokenizer, nxt, float(lp[nxt]))
                    e["top_logprobs"] = [] if top is None else [
                        _entry(tokenizer, int(i), float(v)) for v, i in zip(top.values, top.indices)]
                    lp_content.append(e)
                step_in = torch.tensor([[nxt]])
        text = tokenizer.decode(out_ids[:-1] if finish == "stop" else out_ids, skip_special_tokens=True)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": {"content": lp_content} if want_lp else None, "finish_reason": finish}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out_ids),
                      "total_tokens": len(ids) + len(out_ids)},
        }

    return app


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0,
                    timeout_s: float = 30.0) -> tuple[str, Callable[[], None]]:
    """Run ``app`` with uvicorn in a daemon thread; return ``(base_url, stop)`` once it answers HTTP.

    ``port=0`` takes a free port, so parallel test sessions never collide.
    """
    import httpx
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="protege-local-lm", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"local LM server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    base_url = f"http://{host}:{bound}/v1"
    httpx.get(f"{base_url}/models", timeout=timeout_s)  # any HTTP answer (even 401) means it is serving

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=timeout_s)

    return base_url, stop

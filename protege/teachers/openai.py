"""Any OpenAI-compatible chat-completions server as teacher (OpenAI, vLLM, Ollama, llama.cpp, protege).

Soft labels come from the answer's ``top_logprobs``: at the first generated token that starts a label,
each label takes the summed probability of the top-k tokens that are a prefix of it and of no other
label (stripped, case-insensitive: " Sports" and "sports" both count); the distribution is renormalised
over the labels and the mass that fell on non-label tokens is kept as ``missing_mass``. Multi-token
labels are therefore scored by their first distinguishing token — write labels whose first words differ.
Servers that return no logprobs give the parsed hard label with probability 1 (``soft="hard"``).
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

from ..costs import price_for
from ..task import TaskError, TaskSpec
from .base import Answer, Teacher, build_messages, parse_label, register_teacher, truncate_words


def label_probs_from_top_logprobs(content: list[dict], labels: list[str], answer_prefix: str = "") -> tuple[list[float] | None, float]:
    """Label distribution from a chat completion's logprobs.content list (dicts with token/top_logprobs).

    The distribution is read at the first position whose *generated* token starts a label. Positions
    of an answer prefix ("Topic", ":") are skipped even when their top-k alternatives happen to hold a
    label-like token ("Business" at 0.0003 behind "Topic"): scoring there would return a confident
    distribution built from almost no mass.
    """
    low = [lab.lower() for lab in labels]
    for pos in content:
        chosen = pos["token"].strip().lower()
        if not chosen or not any(lab.startswith(chosen) for lab in low):
            continue  # answer prefix, punctuation or whitespace: the answer starts later
        cands = list(pos.get("top_logprobs") or [])
        if all(c["token"] != pos["token"] for c in cands):  # a sampled token may be outside the top-k
            cands.append({"token": pos["token"], "logprob": pos["logprob"]})
        mass = [0.0] * len(labels)
        for c in cands:
            tok = c["token"].strip().lower()
            if not tok:
                continue
            matches = [i for i, lab in enumerate(low) if lab.startswith(tok)]
            if len(matches) == 1:
                mass[matches[0]] += math.exp(c["logprob"])  # " Sports", "sports" both count
        total = sum(mass)
        if total <= 0:  # only tokens shared by several labels: the first token cannot tell them apart
            return None, 1.0
        return [m / total for m in mass], max(0.0, 1.0 - total)
    return None, 1.0


@register_teacher("openai")
class OpenAITeacher(Teacher):
    def __init__(self, task: TaskSpec):
        super().__init__(task)
        import openai

        cfg = self.cfg
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if cfg.api_key_env and not key and not cfg.base_url:
            raise TaskError(f"teacher.api_key_env: environment variable {cfg.api_key_env} is not set; export it (the key never goes in the task file)")
        self.name = f"openai:{cfg.model}"
        self.client = openai.OpenAI(api_key=key or "none", base_url=cfg.base_url, timeout=cfg.timeout_s,
                                    max_retries=cfg.max_retries)
        self.price_in, self.price_out = price_for(cfg.model, cfg.price_in_per_1m, cfg.price_out_per_1m)
        self.use_logprobs = cfg.top_logprobs > 0

    def request(self, text: str, sample: int = 0) -> dict:
        cfg = self.cfg
        req = {"model": cfg.model, "messages": build_messages(self.task, truncate_words(text, cfg.max_input_tokens)),
               "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
        if cfg.top_logprobs:
            req.update(logprobs=True, top_logprobs=cfg.top_logprobs)
        if sample:
            req["seed"] = sample
        return req

    def estimate_cost(self, request: dict) -> float:
        chars = sum(len(m["content"]) for m in request["messages"])
        return (chars / 3.5) * self.price_in / 1e6 + request["max_tokens"] * self.price_out / 1e6

    def _one(self, req: dict) -> Answer:
        import openai

        t0 = time.perf_counter()
        body = dict(req)
        if not self.use_logprobs:
            body.pop("logprobs", None), body.pop("top_logprobs", None)
        try:
            resp = self.client.chat.completions.create(**body)
        except openai.BadRequestError as e:
            if self.use_logprobs and "logprob" in str(e).lower():  # provider without logprobs: fall back to hard labels
                self.use_logprobs = False
                return self._one(req)
            return Answer(label=None, status="error", error=f"bad request: {e}", latency_s=time.perf_counter() - t0)
        except openai.OpenAIError as e:
            return Answer(label=None, status="error", error=f"{type(e).__name__}: {e}", latency_s=time.perf_counter() - t0)
        dt = time.perf_counter() - t0
        if not resp.choices:
            return Answer(label=None, status="error", error="response has no choices", latency_s=dt)
        ch = resp.choices[0]
        text = (ch.message.content or "").strip()
        u = resp.usage
        tin, tout = (u.prompt_tokens, u.completion_tokens) if u else (0, 0)
        cost = tin * self.price_in / 1e6 + tout * self.price_out / 1e6
        labels = self.task.labels
        label = parse_label(text, labels, self.cfg.answer_prefix)
        probs, missing, soft = None, 0.0, "hard"
        lp = getattr(ch, "logprobs", None)
        if lp is not None and lp.content:
            content = [c.model_dump() for c in lp.content]
            probs, missing = label_probs_from_top_logprobs(content, labels, self.cfg.answer_prefix)
            if probs is not None:
                soft = "logprobs"
        if label is None:
            return Answer(label=None, text=text, status="error",
                          error=f"answer {text[:80]!r} is not one of the labels {labels}",
                          tokens_in=tin, tokens_out=tout, latency_s=dt, cost_usd=cost)
        if probs is None:
            probs = [1.0 if lab == label else 0.0 for lab in labels]
            soft = "hard"
        return Answer(label=label, probs=probs, soft=soft, text=text, missing_mass=missing, tokens_in=tin,
                      tokens_out=tout, latency_s=dt, cost_usd=cost, extra={"finish_reason": ch.finish_reason})

    def answer(self, requests: list[dict]) -> list[Answer]:
        if not requests:  # ThreadPoolExecutor refuses max_workers=0
            return []
        with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(requests))) as pool:
            return list(pool.map(self._one, requests))

    def close(self) -> None:
        self.client.close()

"""Soft labels from an API's ``top_logprobs``: the label distribution a chat model put on its answer, read off
the top-k alternatives of the answer's tokens (multi-token labels included), with the mass it put outside
the label set kept as ``missing_mass``.

At the first generated token that starts a
label, each label takes the summed probability of the top-k tokens that are a prefix of it and of no
other label (stripped, case-insensitive: " Sports" and "sports" both count). *Multi-token labels* are
scored by their first distinguishing token: when the generated token is shared by several labels
(" ne" for "negative" / "neutral"), its probability is split among those labels by the next
position's top-k (P(" ne") x P("utral" | " ne") ...), following the generated path; a shared token the
model did *not* generate cannot be followed and its mass counts as missing. The distribution is
renormalised over the labels and the mass outside them is kept as ``missing_mass``. Servers that return
no logprobs, or refuse the parameter, give the parsed hard label with probability 1 (``soft="hard"``,
the reason in ``extra["soft_fallback"]``).
"""

from __future__ import annotations

import math




def _alternatives(pos: dict) -> list[dict]:
    cands = list(pos.get("top_logprobs") or [])
    if all(c["token"] != pos["token"] for c in cands):  # a sampled token may be outside the top-k
        cands.append({"token": pos["token"], "logprob": pos["logprob"]})
    return cands


def _spread(content: list[dict], j: int, low: list[str], cands: list[int], prefix: str, weight: float,
            mass: list[float]) -> None:
    """Share ``weight`` (P of having generated ``prefix``) among labels ``cands`` by position ``j``'s top-k."""
    pos = content[j]
    for c in _alternatives(pos):
        s = (prefix + c["token"]).strip().lower()
        if not s or s == prefix:
            continue
        hit = [k for k in cands if low[k].startswith(s) or (s.startswith(low[k]) and not s[len(low[k]):][:1].isalnum())]
        p = weight * math.exp(c["logprob"])
        if len(hit) == 1:
            mass[hit[0]] += p  # " Sports", "sports" both count
        elif len(hit) > 1 and c["token"] == pos["token"] and j + 1 < len(content):
            _spread(content, j + 1, low, hit, s, p, mass)  # shared first token: follow the generated path
        # else: a shared token the model did not generate, or no label: missing mass


def label_probs_from_top_logprobs(content: list[dict], labels: list[str], answer_prefix: str = "") -> tuple[list[float] | None, float]:
    """Label distribution from a chat completion's logprobs.content list (dicts with token/top_logprobs).

    The distribution is read at the first position whose *generated* token starts a label. Positions
    of an answer prefix ("Topic", ":") are skipped even when their top-k alternatives happen to hold a
    label-like token ("Business" at 0.0003 behind "Topic"): scoring there would return a confident
    distribution built from almost no mass.
    """
    low = [lab.lower() for lab in labels]
    for j, pos in enumerate(content):
        chosen = pos["token"].strip().lower()
        if not chosen or not any(lab.startswith(chosen) for lab in low):
            continue  # answer prefix, punctuation or whitespace: the answer starts later
        mass = [0.0] * len(labels)
        _spread(content, j, low, list(range(len(labels))), "", 1.0, mass)
        total = sum(mass)
        if total <= 0:  # only tokens shared by several labels, and no later position to tell them apart
            return None, 1.0
        return [m / total for m in mass], max(0.0, 1.0 - total)
    return None, 1.0

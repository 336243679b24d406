"""Per-token top-k log-probabilities of generated text, stored compactly for token-level KD.

A teacher that generates text gives, at each output position, the k most likely tokens and their
log-probs: what ``topk_kl`` trains a student on. As JSON that is ~40 bytes per candidate; here it is
4 + 2 bytes (an int32 id and a float16 log-prob).

Two forms:

* **packed** (one answer, inside the ledger's JSON): ``{"vocab": [...], "chosen": b64 int32[T],
  "ids": b64 int32[T, k], "lp": b64 float16[T, k]}``. ``vocab`` maps ids to token strings for API
  teachers (which return strings); it is absent for local teachers, whose ids are tokenizer ids.
* **file** (a whole dataset, ``topk.safetensors``): ``offsets`` int64[n+1] (item i owns rows
  ``offsets[i]:offsets[i+1]``), ``chosen`` int32[T] and ``chosen_logprob`` float16[T] (the generated token), ``ids`` int32[T, k] (-1 = no candidate),
  ``logprobs`` float16[T, k] (-inf where ids is -1); metadata ``vocab`` (JSON list of strings) when the
  ids index token strings, and ``k``. Items without top-k have an empty row range.

:func:`load_topk` gives rows in the shapes the causal-LM student reads: ``{"token_ids", "ids",
"logprobs"}`` for tokenizer ids, ``{"content": [...]}`` (OpenAI ``logprobs.content``) for strings.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Sequence

import numpy as np


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _unb64(s: str, dtype, shape) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype=dtype).reshape(shape)


def pack_openai_content(content: Sequence[dict]) -> dict | None:
    """OpenAI ``logprobs.content`` (token strings, ``top_logprobs``) → packed form with a local vocab."""
    if not content:
        return None
    vocab: dict[str, int] = {}
    k = max(1, max(len(c.get("top_logprobs") or []) for c in content))
    T = len(content)
    chosen = np.empty(T, np.int32)
    clp = np.array([c.get("logprob") if c.get("logprob") is not None else np.nan for c in content], np.float16)
    ids = np.full((T, k), -1, np.int32)
    lp = np.full((T, k), -np.inf, np.float16)
    for t, c in enumerate(content):
        chosen[t] = vocab.setdefault(c["token"], len(vocab))
        for j, alt in enumerate((c.get("top_logprobs") or [{"token": c["token"], "logprob": c["logprob"]}])[:k]):
            ids[t, j] = vocab.setdefault(alt["token"], len(vocab))
            lp[t, j] = alt["logprob"]
    return {"vocab": list(vocab), "k": k, "T": T, "chosen": _b64(chosen), "clp": _b64(clp), "ids": _b64(ids),
            "lp": _b64(lp)}


def pack_ids(chosen: Sequence[int], ids: Sequence[Sequence[int]], logprobs: Sequence[Sequence[float]]) -> dict:
    """Tokenizer ids (local teacher) → packed form, no vocab."""
    ch = np.asarray(chosen, np.int32)
    a = np.asarray(ids, np.int32).reshape(len(ch), -1)
    lp = np.asarray(logprobs, np.float32).reshape(len(ch), -1).astype(np.float16)
    return {"k": int(a.shape[1]), "T": int(len(ch)), "chosen": _b64(ch), "ids": _b64(a), "lp": _b64(lp)}


def unpack(p: dict) -> dict:
    """Packed → ``{"chosen": int32[T], "ids": int32[T,k], "logprobs": float16[T,k], "vocab": list | None}``."""
    T, k = p["T"], p["k"]
    ids, lp = _unb64(p["ids"], np.int32, (T, k)), _unb64(p["lp"], np.float16, (T, k))
    ch = _unb64(p["chosen"], np.int32, (T,))
    if "clp" in p:
        clp = _unb64(p["clp"], np.float16, (T,))
    else:  # local teachers: the chosen token is the greedy one, the first candidate
        clp = np.array([lp[t][ids[t] == ch[t]][0] if (ids[t] == ch[t]).any() else np.nan for t in range(T)], np.float16)
    return {"chosen": ch, "chosen_logprob": clp, "ids": ids, "logprobs": lp, "vocab": p.get("vocab")}


def save_topk(path: str | Path, packed: Sequence[dict | None]) -> Path:
    """Write one ``topk.safetensors`` for a dataset (``None`` for items without top-k). Atomic."""
    from safetensors.numpy import save_file

    items = [unpack(p) if p else None for p in packed]
    has_vocab = any(it is not None and it["vocab"] is not None for it in items)
    k = max([it["ids"].shape[1] for it in items if it is not None] or [1])
    gvocab: dict[str, int] = {}
    chosen, clps, ids, lps, offsets = [], [], [], [], [0]
    for it in items:
        if it is None:
            offsets.append(offsets[-1])
            continue
        c, a, lp = it["chosen"], it["ids"], it["logprobs"]
        if has_vocab:  # local vocab ids → one dataset-wide vocab
            remap = np.array([gvocab.setdefault(s, len(gvocab)) for s in (it["vocab"] or [])] + [-1], np.int32)
            c, a = remap[c], np.where(a >= 0, remap[a], -1)
        pad = k - a.shape[1]
        if pad:
            a = np.pad(a, ((0, 0), (0, pad)), constant_values=-1)
            lp = np.pad(lp, ((0, 0), (0, pad)), constant_values=-np.inf)
        chosen.append(c.astype(np.int32))
        clps.append(it["chosen_logprob"].astype(np.float16))
        ids.append(a.astype(np.int32))
        lps.append(lp.astype(np.float16))
        offsets.append(offsets[-1] + len(c))
    tensors = {
        "offsets": np.asarray(offsets, np.int64),
        "chosen": np.concatenate(chosen) if chosen else np.zeros(0, np.int32),
        "chosen_logprob": np.concatenate(clps) if clps else np.zeros(0, np.float16),
        "ids": np.concatenate(ids) if ids else np.zeros((0, k), np.int32),
        "logprobs": np.concatenate(lps) if lps else np.zeros((0, k), np.float16),
    }
    meta = {"format": "protege-topk-v1", "k": str(k)}
    if has_vocab:
        meta["vocab"] = json.dumps(list(gvocab), ensure_ascii=False)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_topk(path: str | Path) -> list[dict | None]:
    """Rows of a ``topk.safetensors``: student-ready dicts (see module doc), ``None`` where absent."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        off, chosen, clp, ids, lp = (f.get_tensor(n) for n in ("offsets", "chosen", "chosen_logprob", "ids", "logprobs"))
    vocab = json.loads(meta["vocab"]) if "vocab" in meta else None
    rows: list[dict | None] = []
    for i in range(len(off) - 1):
        a, b = int(off[i]), int(off[i + 1])
        if a == b:
            rows.append(None)
            continue
        if vocab is None:
            keep = [ids[t] >= 0 for t in range(a, b)]
            rows.append({"token_ids": chosen[a:b].tolist(),
                         "ids": [ids[t][m].tolist() for t, m in zip(range(a, b), keep)],
                         "logprobs": [lp[t][m].astype(np.float32).tolist() for t, m in zip(range(a, b), keep)]})
        else:
            content = []
            for t in range(a, b):
                top = [{"token": vocab[j], "logprob": float(v)} for j, v in zip(ids[t], lp[t]) if j >= 0]
                content.append({"token": vocab[chosen[t]], "logprob": float(clp[t]), "top_logprobs": top})
            rows.append({"content": content})
    return rows

"""Causal-LM students, token side: chat rendering, (prompt, completion) examples with the loss on the answer only,
mapping a teacher's tokens onto the student's vocabulary for token-level KD, and batched greedy decoding."""

from __future__ import annotations

import json
import time
from typing import Sequence


def json_string_value(text: str) -> tuple[str, bool]:
    """The value of a JSON string from the text decoded after its opening quote, and whether it ended: the text up
    to the first unescaped ``"``, its escapes (``\\n``, ``\\"``, ``\\u00e9``) decoded; all of it when no quote
    ends it (out of tokens, or decoding stopped at an escaped quote). Schema-constrained decoding reads each value
    with this, so a value holds what the model wrote, not its JSON spelling."""
    i, end = 0, -1
    while (j := text.find('"', i)) >= 0:
        k = j
        while k > 0 and text[k - 1] == "\\":
            k -= 1
        if (j - k) % 2 == 0:  # an even run of backslashes before it: the quote is not escaped
            end = j
            break
        i = j + 1
    raw = text[:end] if end >= 0 else text
    try:
        return json.loads('"' + raw + '"'), end >= 0
    except ValueError:  # cut inside an escape
        return raw, end >= 0


def json_string_body(value: str) -> str:
    """``value`` spelled inside a JSON string, as protege stores teacher answers (``ensure_ascii=False``)."""
    return json.dumps(value, ensure_ascii=False)[1:-1]


class TokenizerMismatch(ValueError):
    """Teacher and student tokenizers disagree and no token mapping exists: token-level KD is impossible."""


def vocab_map(student_tok, teacher_tok):
    """``None`` when both tokenizers share one vocabulary; else a LongTensor ``[V_student]`` of teacher ids.

    The mapping exists when every student token string is also a teacher token (a teacher with extra
    added tokens, a re-ordered vocabulary); the teacher's logits are then read in the student's order.
    """
    import torch

    s, t = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s == t:
        return None
    missing = [tok for tok in s if tok not in t]
    if missing:
        raise TokenizerMismatch(
            f"token-level KD needs the teacher's tokens to mean the same to the student, but {len(missing)} of the "
            f"student's {len(s)} tokens are not in the teacher's vocabulary (e.g. {missing[:3]}) and no mapping "
            f"exists. Use a student from the teacher's family (student.init_from_teacher: true), or train with "
            f"student.kd: none (SFT on the teacher's outputs only).")
    inv = {i: tok for tok, i in s.items()}
    return torch.tensor([t[inv[i]] for i in range(len(s))], dtype=torch.long)


def render(tok, messages: list[dict], completion: str | None = None) -> str:
    """Chat-template text of ``messages`` (+ the assistant ``completion``); a plain layout for base models."""
    if tok.chat_template:
        if completion is None:
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok.apply_chat_template(messages + [{"role": "assistant", "content": completion}], tokenize=False)
    text = "\n\n".join(m["content"] for m in messages if m["role"] != "assistant") + "\n\nAnswer:"
    return text if completion is None else f"{text} {completion}{tok.eos_token or ''}"


def encode_example(tok, messages: list[dict], completion: str) -> tuple[list[int], list[int]]:
    """(input_ids, completion_mask) the way TRL's SFTTrainer builds them for prompt-completion data.

    The completion starts where the tokenised prompt and prompt + completion first differ, so template
    tokens after the answer (end-of-turn) are trained too: the student learns to stop.
    """
    p = tok(render(tok, messages), add_special_tokens=False).input_ids
    f = tok(render(tok, messages, completion), add_special_tokens=False).input_ids
    n = 0
    while n < min(len(p), len(f)) and p[n] == f[n]:
        n += 1
    return f, [0] * n + [1] * (len(f) - n)


def topk_from_openai(tok, content: list[dict]) -> dict | None:
    """OpenAI ``logprobs.content`` (token strings + ``top_logprobs``) → student token ids, or None.

    A candidate whose string is not exactly one student token is dropped (its mass falls into the
    rest bucket of ``topk_kl``); a *chosen* token that is not one student token means the sequences
    cannot be aligned, and the item gets no KD (None).
    """
    def one_id(s: str):
        ids = tok(s, add_special_tokens=False).input_ids
        return ids[0] if len(ids) == 1 else None

    token_ids, ids, lps = [], [], []
    for step in content:
        chosen = one_id(step["token"])
        if chosen is None:
            return None
        token_ids.append(chosen)
        row: dict[int, float] = {}
        for c in step.get("top_logprobs") or [{"token": step["token"], "logprob": step["logprob"]}]:
            i = one_id(c["token"])
            if i is not None and i not in row:
                row[i] = float(c["logprob"])
        ids.append(list(row))
        lps.append(list(row.values()))
    return {"token_ids": token_ids, "ids": ids, "logprobs": lps}


def decode(model, tok, prompts: Sequence[str], *, max_new_tokens: int = 64, top_k: int = 0, batch_size: int = 8,
           description: str | None = None) -> list[dict]:
    """Greedy decoding of rendered ``prompts``: ``{"text", "token_ids", "ids", "logprobs", "seconds"}`` each.

    With ``top_k`` the k most likely next tokens and their log-probs (``log_softmax`` of the raw logits,
    T = 1) are kept for every generated token, end-of-turn included: the stored form of a teacher's
    soft outputs that ``kd="topk"`` trains on.
    """
    import torch
    from transformers import GenerationConfig

    from protege.progress import bar

    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad,
                               output_logits=bool(top_k), return_dict_in_generate=True)
    dev = next(model.parameters()).device
    out: list[dict] = []
    model.eval()
    with bar(description or "decode", len(prompts) if description else 0) as advance, torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            enc = [tok(p, add_special_tokens=False).input_ids for p in prompts[i : i + batch_size]]
            L = max(len(e) for e in enc)
            ids = torch.tensor([[pad] * (L - len(e)) + e for e in enc], device=dev)
            att = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in enc], device=dev)
            t0 = time.perf_counter()
            g = model.generate(input_ids=ids, attention_mask=att, generation_config=gen_cfg)
            dt = (time.perf_counter() - t0) / len(enc)
            new = g.sequences[:, L:].tolist()
            for b, seq in enumerate(new):
                n = seq.index(eos) + 1 if eos in seq else len(seq)
                item = {"text": tok.decode([t for t in seq[:n] if t != eos], skip_special_tokens=True),
                        "token_ids": seq[:n], "finished": eos in seq[:n], "seconds": dt}
                if top_k:
                    lp = torch.log_softmax(torch.stack([s[b] for s in g.logits[:n]]).float(), -1)
                    v, j = lp.topk(top_k, dim=-1)
                    item.update(ids=j.tolist(), logprobs=v.tolist())
                out.append(item)
            advance(len(enc))
    return out

"""A local causal LM as teacher, with soft labels from its next-token logits.

The prompt (instruction + few-shot chat turns + pre-filled answer) is the same for every input, so its
KV cache is computed once and extended per batch: on CPU that halves the cost of a short input. Inputs
are right-padded behind the shared prefix, so position ids simply continue from the prefix and each
item's answer logits are read at its own last real token.

Soft labels: when the label words' first tokens differ, the distribution is the softmax of the
next-token logits over those tokens (one forward pass). When two labels share a first token, every
label is scored by the summed log-probability of its whole token sequence instead (one pass per
label) — slower but exact.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import numpy as np

from ..task import TaskError, TaskSpec, resolve_model_path
from .base import Answer, Teacher, build_messages, register_teacher

_SENTINEL = "\x00PROTEGE_INPUT\x00"


def load_causal_lm(ref: str, gguf_file: str | None = None, dtype: str = "float32"):
    """Load tokenizer + model from a local folder (optionally a GGUF file in it), never from the Hub."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(ref)
    if not Path(path).exists():
        raise TaskError(f"teacher.model: local path {path!r} does not exist (API models need backend: openai)")
    if gguf_file and not (Path(path) / gguf_file).is_file():
        raise TaskError(f"teacher.gguf_file: {gguf_file!r} not found in {path}")
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, **kw)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32, **kw)
    model = model.to(getattr(torch, dtype)).eval()
    return tok, model


@register_teacher("hf")
class HFTeacher(Teacher):
    def __init__(self, task: TaskSpec, model=None, tokenizer=None):
        super().__init__(task)
        import torch

        self.torch = torch
        self.name = f"hf:{self.cfg.model}" + (f"/{self.cfg.gguf_file}" if self.cfg.gguf_file else "")
        if model is None:
            tokenizer, model = load_causal_lm(self.cfg.model, self.cfg.gguf_file, self.cfg.dtype)
        self.tok, self.model = tokenizer, model
        self._prepare_prompt()

    # -- prompt and label tokens ---------------------------------------------------------------
    def _prepare_prompt(self) -> None:
        task, tok = self.task, self.tok
        msgs = build_messages(task, _SENTINEL)
        prefix = self.cfg.answer_prefix
        if tok.chat_template:
            if prefix:
                rendered = tok.apply_chat_template(msgs + [{"role": "assistant", "content": prefix}], tokenize=False,
                                                   continue_final_message=True)
            else:
                rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:  # base model: plain text prompt
            shots = "".join(f"Input: {m['content']}\n" if m["role"] == "user" else f"Output: {m['content']}\n\n"
                            for m in msgs[1:])
            rendered = f"{msgs[0]['content']}\n\n{shots}Output: {prefix}"
        head, _, tail = rendered.partition(_SENTINEL)
        self.prefix_ids = tok(head, add_special_tokens=False).input_ids
        self.suffix_ids = tok(tail, add_special_tokens=False).input_ids
        lead = " " if (prefix and not prefix[-1].isspace()) or (not tok.chat_template) else ""
        self.label_ids = [tok(lead + lab, add_special_tokens=False).input_ids for lab in task.labels]
        firsts = [ids[0] for ids in self.label_ids]
        self.first_token_mode = len(set(firsts)) == len(firsts)
        with self.torch.no_grad():
            out = self.model.base_model(input_ids=self.torch.tensor([self.prefix_ids]), use_cache=True)
        self.prefix_cache = out.past_key_values
        self.head = self.model.get_output_embeddings()

    def request(self, text: str, sample: int = 0) -> dict:
        ids = self.tok(text.strip(), add_special_tokens=False).input_ids[: self.cfg.max_input_tokens]
        return {"input_ids": ids, "labels": self.task.labels, "prompt": self.prefix_ids + [-1] + self.suffix_ids,
                "dtype": self.cfg.dtype, "mode": "first_token" if self.first_token_mode else "sequence"}

    # -- forward -------------------------------------------------------------------------------
    def _hidden(self, seqs: list[list[int]]):
        """Hidden states [B, L, H] of right-padded ``seqs`` continuing the cached prefix."""
        torch = self.torch
        n, P, L = len(seqs), len(self.prefix_ids), max(len(s) for s in seqs)
        ids = torch.full((n, L), self.tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((n, P + L), dtype=torch.long)
        mask[:, :P] = 1
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, P : P + len(s)] = 1
        cache = copy.deepcopy(self.prefix_cache)
        cache.batch_repeat_interleave(n)
        pos = torch.arange(P, P + L).unsqueeze(0).expand(n, -1)
        out = self.model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        return out.last_hidden_state

    def _score(self, inputs: list[list[int]]) -> np.ndarray:
        """Log-scores [B, n_labels] for a batch of truncated inputs."""
        torch = self.torch
        seqs = [x + self.suffix_ids for x in inputs]
        with torch.no_grad():
            if self.first_token_mode:
                h = self._hidden(seqs)
                last = torch.tensor([len(s) - 1 for s in seqs])
                w = self.head.weight[[ids[0] for ids in self.label_ids]]
                return (h[torch.arange(len(seqs)), last] @ w.T).float().numpy()
            # sequence mode: one pass per label, sum of label-token log-probs
            scores = np.zeros((len(seqs), len(self.label_ids)))
            for k, lab in enumerate(self.label_ids):
                full = [s + lab for s in seqs]
                h = self._hidden(full)
                for j, s in enumerate(seqs):
                    pos = torch.arange(len(s) - 1, len(s) - 1 + len(lab))
                    lp = torch.log_softmax(self.head(h[j, pos]).float(), -1)
                    scores[j, k] = lp[torch.arange(len(lab)), torch.tensor(lab)].sum().item()
            return scores

    def answer(self, requests: list[dict]) -> list[Answer]:
        t0 = time.perf_counter()
        try:
            scores = self._score([r["input_ids"] for r in requests])
        except Exception as e:  # a broken batch is recorded per item, never dropped
            return [Answer(label=None, status="error", error=f"{type(e).__name__}: {e}") for _ in requests]
        dt = (time.perf_counter() - t0) / len(requests)
        z = scores - scores.max(1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        cost = dt * self.cfg.usd_per_hour / 3600
        labels = self.task.labels
        return [
            Answer(label=labels[int(p.argmax())], probs=[float(x) for x in p], soft="logits", text=labels[int(p.argmax())],
                   tokens_in=len(self.prefix_ids) + len(r["input_ids"]) + len(self.suffix_ids), tokens_out=1,
                   latency_s=dt, cost_usd=cost)
            for p, r in zip(probs, requests)
        ]

    def time_single(self, texts: list[str]) -> list[float]:
        """Wall seconds per input answered one at a time (for the latency report; not ledgered)."""
        out = []
        for t in texts:
            r = self.request(t)
            t0 = time.perf_counter()
            self._score([r["input_ids"]])
            out.append(time.perf_counter() - t0)
        return out



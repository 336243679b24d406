"""A local causal LM as teacher, with soft labels from its next-token logits.

The prompt (instruction + few-shot chat turns + pre-filled answer) is the same for every input, so its
KV cache is computed once and extended per batch: on CPU that halves the cost of a short input. Inputs
are right-padded behind the shared prefix, so position ids simply continue from the prefix and each
item's answer logits are read at its own last real token.

Soft labels: when the label words' first tokens differ, the distribution is the softmax of the
next-token logits over those tokens (one forward pass). When two labels share a first token, every
label is scored by the summed log-probability of its whole token sequence instead (one pass per
label) — slower but exact.

Self-consistency prompt variants (``teacher.paraphrases`` / ``shuffle_labels``) each get their own
rendered prompt and prefix cache; requests are grouped by prompt, so a batch may mix variants.

Generation (:meth:`HFTeacher.generation_request`): greedy, left-padded batches, the top-k log-probs
of every generated token packed compactly (:mod:`protege.teachers.topk_store`) for token-level KD.
Left padding plus the attention mask keeps each row's positions its own: batched equals one at a time.

Threads (this module and :mod:`protege.teachers.hf_seqcls`): torch's OpenMP threads spin while they wait
for work, so on a small box where another process holds a core, two threads thrash against it (SmolLM2-135M
on 2 cores: ~0.45 s per item with 1 thread, ~6 s with 2 next to a busy process). Importing this module
therefore sets ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep instead of spinning) when torch is not loaded
yet and the variable is unset — libgomp reads it once, when torch loads. Forward passes then run with:

- ``teacher.torch_threads`` when the task sets it, else ``$PROTEGE_TORCH_THREADS`` (a whole number ≥ 1);
- otherwise every CPU this process may run on (``os.sched_getaffinity``, never more than torch's own
  setting, so ``OMP_NUM_THREADS`` and a caller's ``torch.set_num_threads`` still cap it), less one when
  torch was loaded with its spinning default (too late for PASSIVE): one thread short on an idle box
  costs far less than spinning against a busy one.

The count is set around each forward pass and restored after, so the rest of the process keeps its own.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protege.task import TaskError, TaskSpec, resolve_model_path
from protege.teachers.base import Answer, Teacher, answers_from_scores
from protege.teachers.prompts import build_messages, preclip
from protege.teachers.variants import variant_task

_SENTINEL = "\x00PROTEGE_INPUT\x00"
THREADS_ENV = "PROTEGE_TORCH_THREADS"

if "torch" not in sys.modules:  # libgomp reads the wait policy once, when torch loads
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# whether torch's OpenMP threads sleep (PASSIVE) rather than spin while idle, fixed when torch loads
_PASSIVE_AT_IMPORT = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def teacher_threads(cfg) -> int:
    """Intra-op torch threads for a local teacher's forward passes (the rules are in the module docstring)."""
    import torch

    explicit = cfg.torch_threads
    if explicit is None and os.environ.get(THREADS_ENV, "").strip():
        raw = os.environ[THREADS_ENV].strip()
        try:
            explicit = int(raw)
        except ValueError:
            raise TaskError(f"${THREADS_ENV}={raw!r}: expected a whole number of threads, e.g. 1") from None
    if explicit is not None:
        if int(explicit) < 1:
            raise TaskError(f"torch threads for the teacher must be >= 1, got {explicit}")
        return int(explicit)
    n = min(torch.get_num_threads(), available_cpus())
    passive = _PASSIVE_AT_IMPORT or os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
    return max(1, n if passive else n - 1)


@contextlib.contextmanager
def torch_threads(torch, n: int):
    """Run a block with ``n`` intra-op threads, then restore the previous count."""
    old = torch.get_num_threads()
    if n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


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


@dataclass
class _Prompt:
    """One rendered prompt (a self-consistency variant has its own): pieces around the input, label token
    ids (always in the task's label order), and the KV cache of the shared prefix."""

    prefix_ids: list[int]
    suffix_ids: list[int]
    label_ids: list[list[int]]
    first_token_mode: bool
    cache: object


GENERATION = "generate"  # request mode of free-text requests (part of their ledger key)


class HFTeacher(Teacher):
    local, logits, logprobs, generation, concurrent = True, True, True, True, False  # registry.Capabilities

    def __init__(self, task: TaskSpec, model=None, tokenizer=None):
        super().__init__(task)
        import torch

        self.torch = torch
        self.name = f"hf:{self.cfg.model}" + (f"/{self.cfg.gguf_file}" if self.cfg.gguf_file else "")
        if model is None:
            tokenizer, model = load_causal_lm(self.cfg.model, self.cfg.gguf_file, self.cfg.dtype)
        self.tok, self.model = tokenizer, model
        self.threads = teacher_threads(self.cfg)
        self.head = self.model.get_output_embeddings()
        self._prompts: dict[tuple, _Prompt] = {}
        self._prepare_prompt()

    # -- prompt and label tokens ---------------------------------------------------------------
    def _prepare_prompt(self) -> None:
        p = self._prompt_for(0)
        # the task's own prompt, as attributes (callers and tests read them)
        self.prefix_ids, self.suffix_ids, self.label_ids = p.prefix_ids, p.suffix_ids, p.label_ids
        self.first_token_mode, self.prefix_cache = p.first_token_mode, p.cache

    def _prompt_for(self, sample: int) -> _Prompt:
        vt = variant_task(self.task, sample)
        key = (vt.instruction, tuple(vt.labels))
        if key not in self._prompts:
            self._prompts[key] = self._render(vt)
        return self._prompts[key]

    def _render(self, task: TaskSpec) -> _Prompt:
        tok = self.tok
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
        prefix_ids = tok(head, add_special_tokens=False).input_ids
        suffix_ids = tok(tail, add_special_tokens=False).input_ids
        lead = " " if (prefix and not prefix[-1].isspace()) or (not tok.chat_template) else ""
        label_ids = [tok(lead + lab, add_special_tokens=False).input_ids for lab in self.task.labels]
        firsts = [ids[0] for ids in label_ids]
        with self.torch.no_grad(), torch_threads(self.torch, self.threads):
            out = self.model.base_model(input_ids=self.torch.tensor([prefix_ids]), use_cache=True)
        return _Prompt(prefix_ids, suffix_ids, label_ids, len(set(firsts)) == len(firsts), out.past_key_values)

    def request(self, text: str, sample: int = 0) -> dict:
        p = self._prompt_for(sample)
        ids = self.tok(preclip(text, self.cfg.max_input_tokens).strip(), add_special_tokens=False).input_ids[
            : self.cfg.max_input_tokens]  # preclip: a 50 MB line is not tokenized whole
        return {"input_ids": ids, "labels": self.task.labels, "prompt": p.prefix_ids + [-1] + p.suffix_ids,
                "dtype": self.cfg.dtype, "mode": "first_token" if p.first_token_mode else "sequence"}

    def _prompt_of(self, request: dict) -> _Prompt:
        want = request["prompt"]
        for p in self._prompts.values():
            if p.prefix_ids + [-1] + p.suffix_ids == want:
                return p
        raise ValueError("request was built for a prompt this teacher does not hold (another task or variant)")

    # -- forward -------------------------------------------------------------------------------
    def _hidden(self, seqs: list[list[int]], prompt: _Prompt | None = None):
        """Hidden states [B, L, H] of right-padded ``seqs`` continuing the cached prefix."""
        torch = self.torch
        prompt = prompt or self._prompt_for(0)
        n, P, L = len(seqs), len(prompt.prefix_ids), max(len(s) for s in seqs)
        ids = torch.full((n, L), self.tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((n, P + L), dtype=torch.long)
        mask[:, :P] = 1
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, P : P + len(s)] = 1
        cache = copy.deepcopy(prompt.cache)
        cache.batch_repeat_interleave(n)
        pos = torch.arange(P, P + L).unsqueeze(0).expand(n, -1)
        out = self.model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        return out.last_hidden_state

    def _score(self, inputs: list[list[int]], prompt: _Prompt | None = None) -> np.ndarray:
        """Log-scores [B, n_labels] for a batch of truncated inputs."""
        torch = self.torch
        prompt = prompt or self._prompt_for(0)
        seqs = [x + prompt.suffix_ids for x in inputs]
        with torch.no_grad(), torch_threads(torch, self.threads):
            if prompt.first_token_mode:
                h = self._hidden(seqs, prompt)
                last = torch.tensor([len(s) - 1 for s in seqs])
                w = self.head.weight[[ids[0] for ids in prompt.label_ids]]
                return (h[torch.arange(len(seqs)), last] @ w.T).float().numpy()
            # sequence mode: one pass per label, sum of label-token log-probs
            scores = np.zeros((len(seqs), len(prompt.label_ids)))
            for k, lab in enumerate(prompt.label_ids):
                full = [s + lab for s in seqs]
                h = self._hidden(full, prompt)
                for j, s in enumerate(seqs):
                    pos = torch.arange(len(s) - 1, len(s) - 1 + len(lab))
                    lp = torch.log_softmax(self.head(h[j, pos]).float(), -1)
                    scores[j, k] = lp[torch.arange(len(lab)), torch.tensor(lab)].sum().item()
            return scores

    def answer(self, requests: list[dict]) -> list[Answer]:
        """Label requests (grouped by prompt variant) and generation requests, each group batched."""
        out: list[Answer | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for j, r in enumerate(requests):
            groups.setdefault((GENERATION,) if r.get("mode") == GENERATION else tuple(r["prompt"]), []).append(j)
        for key, idx in groups.items():
            batch = [requests[j] for j in idx]
            got = self._generate(batch) if key == (GENERATION,) else self._answer_labels(batch)
            for j, a in zip(idx, got):
                out[j] = a
        return out  # type: ignore[return-value]

    def _answer_labels(self, requests: list[dict]) -> list[Answer]:
        t0 = time.perf_counter()
        try:
            prompt = self._prompt_of(requests[0])
            scores = self._score([r["input_ids"] for r in requests], prompt)
        except Exception as e:
            return Answer.local_errors(e, len(requests))
        dt = (time.perf_counter() - t0) / len(requests)
        fixed = len(prompt.prefix_ids) + len(prompt.suffix_ids)
        return answers_from_scores(self.task.labels, scores, tokens_in=[fixed + len(r["input_ids"]) for r in requests],
                                   tokens_out=1, latency_s=dt, cost_usd=dt * self.cfg.usd_per_hour / 3600)

    # -- generation: text plus per-token top-k -----------------------------------------------------
    def generation_request(self, messages: list[dict] | str, sample: int = 0, *, top_k: int | None = None,
                           max_new_tokens: int | None = None) -> dict:
        """Greedy generation with the top-k log-probs of every generated token (``top_k`` defaults to
        ``teacher.top_logprobs``). A string is the user turn after the task's instruction."""
        if isinstance(messages, str):
            messages = [{"role": "system", "content": self.task.instruction.strip()},
                        {"role": "user", "content": messages.strip()}]
        if self.tok.chat_template:
            ids = self.tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        else:
            ids = self.tok("\n\n".join(m["content"] for m in messages) + "\n\n", add_special_tokens=False).input_ids
        return {"input_ids": ids, "mode": GENERATION, "top_k": self.cfg.top_logprobs if top_k is None else top_k,
                "max_new_tokens": max_new_tokens or self.cfg.max_tokens, "dtype": self.cfg.dtype}

    def _generate(self, requests: list[dict]) -> list[Answer]:
        """Left-padded batches through ``model.generate`` (greedy); per step, log_softmax of the raw logits
        and its top-k. Rows end at their own end-of-sequence token; padding never reaches the answer."""
        from protege.teachers.topk_store import pack_ids

        torch, tok = self.torch, self.tok
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0)
        t0 = time.perf_counter()
        try:
            enc = [r["input_ids"] for r in requests]
            L = max(len(e) for e in enc)
            ids = torch.tensor([[pad] * (L - len(e)) + e for e in enc])
            att = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in enc])
            k = max(int(r.get("top_k") or 0) for r in requests)
            n_new = max(int(r["max_new_tokens"]) for r in requests)
            with torch.no_grad(), torch_threads(torch, self.threads):
                g = self.model.generate(input_ids=ids, attention_mask=att, max_new_tokens=n_new, do_sample=False,
                                        eos_token_id=eos, pad_token_id=pad, output_logits=True,
                                        return_dict_in_generate=True)
        except Exception as e:
            return Answer.local_errors(e, len(requests))
        dt = (time.perf_counter() - t0) / len(requests)
        out = []
        for b, r in enumerate(requests):
            seq = g.sequences[b, L:].tolist()[: int(r["max_new_tokens"])]
            n = seq.index(eos) + 1 if eos in seq else len(seq)
            seq = seq[:n]
            text = tok.decode([t for t in seq if t != eos], skip_special_tokens=True)
            extra: dict = {"finish_reason": "stop" if eos in seq else "length"}
            rk = int(r.get("top_k") or 0)
            if rk:
                lp = torch.log_softmax(torch.stack([g.logits[t][b] for t in range(n)]).float(), -1)
                v, j = lp.topk(min(rk, k), dim=-1)
                extra["topk"] = pack_ids(seq, j.tolist(), v.tolist())
            out.append(Answer(label=text, text=text, soft="logits" if rk else "none", tokens_in=len(r["input_ids"]),
                              tokens_out=n, latency_s=dt, cost_usd=dt * self.cfg.usd_per_hour / 3600, extra=extra))
        return out

    def time_single(self, texts: list[str]) -> list[float]:
        """Wall seconds per input answered one at a time (for the latency report; not ledgered)."""
        from protege.timing import time_each

        return time_each([self.request(t) for t in texts], lambda r: self._score([r["input_ids"]]))

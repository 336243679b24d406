"""Greedy decoding for causal-LM students with ONNX Runtime GenAI: one KV cache, reused as far as prompts agree.

The student folder stays a plain HF model (the reference); its ONNX copies are built and cached beside it by
:mod:`protege.students.ortgenai_build`.

Why a second runtime beside CTranslate2, and how it decodes (measured in bench/genstudent.py, README
"genstudent"): a 135M model in float32 on 2 cores is bound by memory bandwidth (~80 ms to stream 540 MB of
weights per decode step), so the only ways to cut a single item's latency *without changing its answers* are
fewer forward passes and less prompt to prefill:

* **prefix KV reuse** — one ``og.Generator`` is kept; a new prompt rewinds it (``rewind_to``) to the longest
  prefix it shares with what is cached (the system prompt and schema: ~175 of ~220 tokens on the parcel task)
  and appends only the rest;
* **forced tokens appended, not re-prefilled** — schema-constrained extraction appends ``, "key": "`` to the same
  cache (``append_tokens``) instead of starting over;
* **prompt-lookup drafts, verified exactly** — extraction copies much of its answer from the input (tracking
  codes, names, cities). After each token the longest recent n-gram of the answer is looked up in the prompt
  and the tokens that followed it there are appended as a draft; one forward pass scores them all (the ONNX
  graph returns logits for every appended position) and the draft is kept up to the first token greedy
  decoding would not have chosen — the answer is the greedy answer, only fewer passes are run.
* **the next key in the same pass** — during constrained extraction a pass that may end a value (after a copied
  draft, cut where its word ends, or at a length the field's values have had) also appends the closing quote and
  the next field's key; where the value does end, the next value's first token is read off that pass: one pass
  fewer per field boundary (``_greedy``'s ``follow``). A copy is also looked up as *text* when its tokens differ
  from the prompt's (``text_draft``: `` Dublin`` in the notice, ``Dub`` + ``lin`` after a quote). Each appended
  token costs its logits row (~1.2 ms against ~21 ms for a one-token pass), hence "where a value plausibly ends".
* **whole guessed answers** — a :class:`ValueMemory` (the values the training answers had, unit factors and
  number formats learned from the pairs, shapes, ISO dates; saved with the student, grown by its own answers)
  proposes each field's value; from a field's key on, its candidate and the next fields' are appended as one
  draft (``_guess``, ``_chain``), so the prompt's own pass can verify the whole answer. Parcel answers
  (bench/genstudent.py, 50 items): passes 17.4 -> 3.0, answers unchanged.
* **int8 drafts, float32 verifies** (``compute_type: int8_verified``) — the builder's int8 copy (blockwise int8
  weights and activations) runs ~2.5x faster per one-token pass but changed 12-17% of the parcel answers, and no
  builder option tried keeps >= 98% (bench/ortgenai_quant.py). So the int8 copy only *proposes* all remaining
  values; the answer they spell is appended to the float32 cache in one pass and read off it for as long as
  float32's greedy choice agrees (free decoding: up to :data:`MODEL_DRAFT` tokens per check): float32's answers
  token for token. Both sessions run with onnxruntime's pool spinning off (two pools taking turns on two busy
  cores otherwise spin on each other's: 2x slower). Slower than float32 alone once whole-answer guesses work:
  it pays two prefills.

Constrained extraction itself (spelling the answer, reading values as JSON, ``_fields`` / ``_verified``) lives in
:mod:`protege.students.ortgenai_fields`. Greedy only (``stream`` also samples). Not thread-safe by itself:
``decode`` / ``decode_fields`` hold a lock (the serving batcher calls them from one thread anyway); ``stream`` uses
a generator of its own.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from protege.students.drafts import ValueMemory, lookup_draft, text_draft
from protege.students.ortgenai_fields import FieldDecoding, logprob
from protege.students.ortgenai_build import convert, ortgenai_folder

MODEL_DRAFT = 12  # tokens the int8 copy proposes at a time (a parcel value is 2-11 tokens and ends the draft early)


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def ortgenai_decoder(student_dir: str | Path, tokenizer, compute_type: str = "float32", threads: int = 0,
                     draft_tokens: int = 6) -> "OrtGenAIDecoder":
    """The decoder a student folder's ``compute_type`` asks for, converted first where needed (``int8_verified``:
    the float32 copy, with the int8 copy as its drafter)."""
    folder = convert(student_dir, compute_type)
    if compute_type != "int8_verified":
        return OrtGenAIDecoder(folder, tokenizer, compute_type, threads, draft_tokens)
    drafter = OrtGenAIDecoder(ortgenai_folder(student_dir, "int8"), tokenizer, "int8", threads, draft_tokens, spin=False)
    return OrtGenAIDecoder(folder, tokenizer, compute_type, threads, draft_tokens, drafter=drafter, spin=False)


class OrtGenAIDecoder(FieldDecoding):
    """``decode`` / ``decode_fields`` / ``stream`` like :class:`protege.students.fast_lm.CT2Decoder`, on onnxruntime-genai.
    With a ``drafter`` (another decoder, e.g. the int8 copy) its greedy tokens are the drafts, checked here."""

    def __init__(self, folder: str | Path, tokenizer, compute_type: str = "float32", threads: int = 0,
                 draft_tokens: int = 6, drafter: "OrtGenAIDecoder | None" = None, spin: bool = True):
        import onnxruntime_genai as og

        self.og, self.tok, self.compute_type, self.draft_tokens = og, tokenizer, compute_type, draft_tokens
        self.drafter = drafter
        cfg = og.Config(str(folder))
        opts = {"intra_op_num_threads": threads or min(os.cpu_count() or 1, 8), "inter_op_num_threads": 1}
        if not spin:  # idle pool threads sleep instead of spinning: two sessions taking turns (int8_verified)
            opts["session.intra_op.allow_spinning"] = "0"  # would otherwise steal each other's cores
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": opts}}}))
        self.model = og.Model(cfg)
        self.context = int(json.loads((Path(folder) / "genai_config.json").read_text())["model"]["context_length"])
        vocab = tokenizer.get_vocab()
        stops = [tokenizer.eos_token, "<|im_end|>", "<|endoftext|>"]
        self.stop_ids = {vocab[t] for t in stops if t and t in vocab}
        self.quote_ends: set[int] | None = None  # tokens holding '"': the end of a constrained value
        self.words = [""] * max(len(tokenizer), max(vocab.values()) + 1)  # token text without a leading space
        self.word_starts: set[int] = set()  # tokens that begin a new word or stand outside one (space, punctuation)
        for t, i in vocab.items():
            self.words[i] = t[1:] if t[:1] in ("Ġ", "▁") else t
            if t[:1] in ("Ġ", "▁", "Ċ") or (t and t[0] in ",;:!?()[]\n" and len(t) <= 2):
                self.word_starts.add(i)
        self.lock = threading.Lock()
        self.gen, self.ids, self.max_len = None, [], 0
        self.passes = 0  # forward passes run (what drafts save), for the bench
        self._src_key, self._src_text = None, ""  # the prompt as text, for text_draft
        self._rows, self._rows_from = None, 0  # the last pass's logits and the position of their first row
        self.fold_keys = True  # constrained: the next key rides on the pass that may end a value (``_greedy``)
        self.value_lengths: dict[str, set[int]] = {}  # field -> value lengths (tokens) seen: where to append a key
        self.memory = ValueMemory()  # field -> past values: whole-answer drafts (``_guess``); the student seeds it
        self.learn = False  # True: the memory also counts the values this decoder answers (off: requests' values
        # would stay in memory, be saved with the student, and make answers that repeat them measurably faster)
        self.name = f"onnxruntime-genai {compute_type}"

    # -- the shared cache ---------------------------------------------------------------------------------
    def _generator(self, max_len: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=max_len)
        return self.og.Generator(self.model, params)

    def _feed(self, target: Sequence[int], need_from: int) -> np.ndarray:
        """Make the cache hold ``target`` (and possibly more after it, from a longer pass); the logits of positions
        ``need_from`` .. ``len(target) - 1`` (one row each)."""
        if len(target) + self.draft_tokens + 2 > self.max_len:
            self.max_len = min(self.context, max(2048, 2 * len(target)))
            if len(target) + 1 > self.max_len:
                raise ValueError(f"prompt of {len(target)} tokens exceeds the model's context of {self.context}")
            self.gen, self.ids = self._generator(self.max_len), []
        if self._rows is not None and len(target) <= len(self.ids) and need_from >= self._rows_from \
                and list(target) == self.ids[:len(target)]:  # the last pass already ran over these tokens
            return self._rows[need_from - self._rows_from:len(target) - self._rows_from]
        k = min(_common(self.ids, target), need_from)
        if k == 0 and self.ids:
            self.gen, self.ids = self._generator(self.max_len), []
        elif k < len(self.ids):
            self.gen.rewind_to(k)
            self.ids = self.ids[:k]
        self._rows = None  # a failed pass below leaves no rows that could pass for its own
        try:
            self.gen.append_tokens(np.asarray(target[k:], dtype=np.int32))
        except BaseException:  # the cache's state is unknown: start the next call afresh
            self.gen, self.ids = self._generator(self.max_len), []
            raise
        self.ids = list(target)
        self.passes += 1
        rows = np.asarray(self.gen.get_output("logits"))[0][need_from - k:]
        self._rows, self._rows_from = rows, need_from  # only what was asked for: a prefill's rows are ~100 MB
        return rows

    def _draft(self, seq: list[int], done: int, k: int, stops: set[int], source: Sequence[int]) -> list[int]:
        """Up to ``k`` tokens proposed to follow ``seq`` (``done`` of them decoded already): the drafter's greedy
        tokens, else a prompt lookup (after the first decoded token)."""
        if k <= 0:
            return []
        if self.drafter is not None:
            return self.drafter._greedy(seq, min(k, MODEL_DRAFT), stops, source)[0]
        if not done or not self.draft_tokens:
            return []
        k = min(self.draft_tokens, k)
        return (lookup_draft(seq[-done - 2:], source, k, words=self.words)
                or text_draft(self.tok.decode(seq[-done:], skip_special_tokens=True), self._text(source), k,
                              self._tokens))

    def _text(self, source: Sequence[int]) -> str:
        """``source`` (the prompt) as text, decoded once per prompt."""
        key = (len(source), hash(tuple(source)))
        if self._src_key != key:
            self._src_key, self._src_text = key, self.tok.decode(list(source), skip_special_tokens=True)
        return self._src_text

    def _tokens(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def _greedy(self, prefix: Sequence[int], max_new: int, stops: set[int], source: Sequence[int],
                follow=None, guess=None, opened: int | None = None) -> tuple[list, list]:
        """Greedy tokens after ``prefix`` (the stop token included when reached), their log-probs. Each pass
        appends the tokens decoded so far plus a draft, and keeps the draft up to the first token greedy decoding
        would not have chosen (that token, or the one after a wholly kept draft, comes from the same pass).

        ``follow(ids, drafted)``: the tokens that come next if the answer stops after ``ids`` (constrained extraction: the
        closing quote and the next field's key, as the next field will tokenise them), appended after the draft
        in the same pass. Where the value does end there, the next field's first pass finds its tokens already
        in the cache and its logits already computed (``_feed`` returns them without a pass): one pass fewer
        per field, and the logits are those a separate pass would give (same tokens, same positions).

        ``guess(ids)``: the rest of a whole guessed answer after ``ids`` (constrained extraction: this value and
        the following ones from :class:`ValueMemory` candidates), appended instead of a draft and ``follow``.

        ``opened``: where a JSON string value began (in ``prefix``); a stop token then ends decoding only where it
        ends the value (``_ends``: not an escaped quote)."""
        prefix = list(prefix)
        out: list[int] = []
        lps: list[float] = []
        while True:
            draft = guess(prefix + out) if guess is not None else []
            if draft and len(prefix) + len(out) + len(draft) + 2 > self.context:
                draft = []
            tail: list[int] = []
            if not draft:
                draft = self._draft(prefix + out, len(out), max_new - len(out) - 1, stops, source)
                if follow is not None and draft:  # a copied value most often ends where the copied word ends
                    draft = draft[:next((j for j in range(1, len(draft)) if draft[j] in self.word_starts),
                                        len(draft))]
                tail = follow(prefix + out + draft, bool(draft)) if follow is not None and (out or draft) else []
            ids = prefix + out + draft
            if len(ids) + len(tail) + self.draft_tokens + 2 > self.context:  # near the context: never fail for it
                tail = []
            rows = self._feed(ids + tail, len(prefix) + len(out) - 1)
            if not len(rows):  # cannot happen (a pass always covers its last position); never spin on it
                raise RuntimeError("onnxruntime-genai returned no logits for the position decoded")
            for j, row in enumerate(rows):
                t = int(row.argmax())
                out.append(t)
                lps.append(logprob(row, t))
                if (t in stops and (opened is None or self._ends((prefix + out)[opened:]))) or len(out) >= max_new:
                    return out, lps
                if j >= len(draft) or t != draft[j]:
                    break

    # -- the CT2Decoder interface -------------------------------------------------------------------------
    def decode(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[dict]:
        """``{"text", "token_ids", "finished", "seconds", "confidence", "decoded_tokens"}`` per prompt, one at a time."""
        out = []
        for p in prompts:
            t0 = time.perf_counter()
            with self.lock:
                seq, lps = self._greedy(p, max_new_tokens, self.stop_ids, p)
            finished = seq[-1] in self.stop_ids
            body = seq[:-1] if finished else seq
            out.append({"text": self.tok.decode(body, skip_special_tokens=True), "token_ids": seq,
                        "finished": finished, "seconds": time.perf_counter() - t0,
                        "confidence": math.exp(sum(lps) / len(lps)), "decoded_tokens": len(seq)})
        return out

    def decode_fields(self, prompts: Sequence[Sequence[int]], fields: Sequence[str], max_value_tokens: int = 48,
                      static: Sequence[int] = ()) -> list[dict]:
        """Schema-constrained: keys, quotes and separators appended to the cache, only values decoded. The
        answer so far is tokenised whole each field (what CTranslate2's path feeds too); the cache is rewound
        only as far as that tokenisation differs. ``static`` is not needed: any shared prefix is reused."""
        if self.quote_ends is None:
            self.quote_ends = {i for t, i in self.tok.get_vocab().items() if '"' in t} | self.stop_ids
        out = []
        for p in prompts:
            t0 = time.perf_counter()
            with self.lock:
                item = p[len(static):] if static and list(p[:len(static)]) == list(static) else p
                text = self.tok.decode(list(item), skip_special_tokens=True)
                cands = self.memory.for_input(fields, text) if self.draft_tokens else {}
                got = self._verified(list(p), fields, max_value_tokens, cands) if self.drafter else \
                    self._fields(list(p), "{", fields, 0, max_value_tokens, cands)
                for name, g in zip(fields, got):
                    if g[1] and g[0] and self.learn:
                        self.memory.remember(name, g[0])
            values = {name: g[0] for name, g in zip(fields, got)}
            decoded, lp_sum = sum(len(g[2]) for g in got), sum(sum(g[3]) for g in got)
            text = json.dumps(values, ensure_ascii=False)
            out.append({"text": text, "token_ids": None, "finished": all(g[1] for g in got),
                        "seconds": time.perf_counter() - t0,
                        "confidence": math.exp(max(-50.0, lp_sum / max(1, decoded))), "decoded_tokens": decoded,
                        "answer_tokens": len(self._tokens(text))})
        return out

    def stream(self, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.0, seed: int | None = None):
        """(token id, log-prob) as decoded, on a generator of its own; the stop token ends the stream unyielded."""
        gen = self._generator(min(self.context, len(prompt) + max_new_tokens + 1))
        gen.append_tokens(np.asarray(list(prompt), dtype=np.int32))
        rng = np.random.default_rng(seed)
        for _ in range(max_new_tokens):
            row = np.asarray(gen.get_output("logits"))[0, -1].astype(np.float64)
            if temperature and temperature > 0:
                z = row / temperature
                prob = np.exp(z - z.max())
                t = int(rng.choice(len(prob), p=prob / prob.sum()))
            else:
                t = int(row.argmax())
            if t in self.stop_ids:
                return
            yield t, logprob(row, t)
            gen.append_tokens(np.asarray([t], dtype=np.int32))

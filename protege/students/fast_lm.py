"""Fast greedy decoding for causal-LM students: CTranslate2 on the CPU, and schema-constrained extraction.

transformers' eager ``generate`` spends most of a small model's decode step in Python and framework
overhead (~11 tokens/s for SmolLM2-135M on 2 cores); CTranslate2 runs the same weights through fused C++
kernels (float32 by default: the same answers; int8 is faster and changes some). Measured candidates
and the choice are in bench/genstudent.py and the README; ``runtime="ortgenai"`` (onnxruntime-genai,
protege.students.ortgenai_lm) is the other fast path and what ``auto`` prefers (see AUTO_ORDER).
The student folder stays a plain HF model (the reference); the CTranslate2 copy is converted from it on
first use and cached beside it (``<student>/ct2-<int8|float32>/``), so a retrained student is never
served from a stale conversion (the folder is rewritten whole by the train stage).

**Schema-constrained decoding** (extract tasks whose schema is an object of required string fields):
keys, quotes, braces and separators are forced; the model only generates each value, stopping at the
token that closes its quote. ``{"a": "`` is appended to the prompt, the value decoded, then ``", "b": "``,
and so on. Fewer tokens are decoded (the report counts them) and every answer is valid JSON in schema
order. The common prompt prefix (system prompt + schema) is cached once (``static_prompt``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

from protege.students.lm_tokens import json_string_body, json_string_value

COMPUTE_TYPES = ("int8", "int8_float32", "float32")


def ctranslate2_available() -> bool:
    return importlib.util.find_spec("ctranslate2") is not None


def string_fields(schema: dict | None) -> list[str] | None:
    """The field names when every top-level property is a required plain string, else None (not constrainable)."""
    if not schema or schema.get("type") != "object":
        return None
    props = schema.get("properties") or {}
    if not props or set(schema.get("required") or []) != set(props):
        return None
    if any(not isinstance(p, dict) or p.get("type") != "string" or set(p) - {"type", "description"}
           for p in props.values()):
        return None
    return list(props)


def ct2_folder(student_dir: str | Path, compute_type: str) -> Path:
    return Path(student_dir) / ("ct2-int8" if compute_type.startswith("int8") else "ct2-float32")


def convert(student_dir: str | Path, compute_type: str = "float32") -> Path:
    """The CTranslate2 copy of a saved HF causal-LM folder (LoRA already merged on save), converted once."""
    dest = ct2_folder(student_dir, compute_type)
    if (dest / "model.bin").is_file():
        return dest
    import ctranslate2

    tmp = Path(tempfile.mkdtemp(prefix=".ct2-", dir=Path(student_dir)))
    try:
        conv = ctranslate2.converters.TransformersConverter(str(student_dir), load_as_float16=False)
        conv.convert(str(tmp / "m"), quantization="int8" if compute_type.startswith("int8") else "float32", force=True)
        os.replace(tmp / "m", dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


class CT2Decoder:
    """Greedy decoding of token-id prompts with a CTranslate2 ``Generator`` (thread-safe; batches a list)."""

    def __init__(self, folder: str | Path, tokenizer, compute_type: str = "float32", threads: int = 0):
        import ctranslate2

        self.tok, self.compute_type = tokenizer, compute_type
        self.gen = ctranslate2.Generator(str(folder), device="cpu", compute_type=compute_type,
                                         intra_threads=threads or min(os.cpu_count() or 1, 8), inter_threads=1)
        stops = [tokenizer.eos_token, "<|im_end|>", "<|endoftext|>"]
        vocab = tokenizer.get_vocab()
        self.stop = [t for t in dict.fromkeys(stops) if t and t in vocab]
        self.quote_ends = None  # tokens containing '"': the end of a constrained value (built on first use)
        self.name = f"ctranslate2 {compute_type}"

    def _toks(self, ids: Sequence[int]) -> list[str]:
        return self.tok.convert_ids_to_tokens(list(ids))

    def decode(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[dict]:
        """``{"text", "token_ids", "finished", "seconds", "confidence", "decoded_tokens"}`` per prompt, one batch."""
        t0 = time.perf_counter()
        res = self.gen.generate_batch([self._toks(p) for p in prompts], max_length=max_new_tokens, sampling_topk=1,
                                      include_prompt_in_result=False, end_token=self.stop, return_scores=True,
                                      return_end_token=True)
        dt = (time.perf_counter() - t0) / max(1, len(prompts))
        stop_ids = set(self.tok.convert_tokens_to_ids(self.stop))
        out = []
        for r in res:
            seq = list(r.sequences_ids[0])
            finished = bool(seq) and seq[-1] in stop_ids
            body = seq[:-1] if finished else seq
            out.append({"text": self.tok.decode(body, skip_special_tokens=True), "token_ids": seq, "finished": finished,
                        "seconds": dt, "confidence": _exp(r.scores[0]) if r.scores else None,
                        "decoded_tokens": len(seq)})
        return out

    def decode_fields(self, prompts: Sequence[Sequence[int]], fields: Sequence[str], max_value_tokens: int = 48,
                      static: Sequence[int] = ()) -> list[dict]:
        """Schema-constrained: only the values of ``fields`` are decoded, all prompts in one batch per field."""
        if self.quote_ends is None:
            # byte-level BPE spells '"' as itself; SentencePiece too: a token string holding it ends the value
            self.quote_ends = [t for t in self.tok.get_vocab() if '"' in t] + self.stop
        t0 = time.perf_counter()
        n = len(prompts)
        prefix, values = ["{"] * n, [dict() for _ in range(n)]
        decoded, logp, ok = [0] * n, [0.0] * n, [True] * n
        kw = {"static_prompt": self._toks(static), "cache_static_prompt": True} if static else {}
        for k, name in enumerate(fields):
            for i in range(n):
                prefix[i] += ("" if k == 0 else ", ") + json.dumps(name, ensure_ascii=False) + ': "'
            batch = [self._toks(list(p)[len(static):] + self.tok(prefix[i], add_special_tokens=False).input_ids)
                     for i, p in enumerate(prompts)]
            seqs, scores = [[] for _ in range(n)], [0.0] * n
            todo = list(range(n))
            while todo:  # an escaped quote (\\") stops generation without ending the value: go on from there
                by_used: dict[int, list[int]] = {}  # one batch per tokens already used: each its own max_length
                for i in todo:
                    by_used.setdefault(len(seqs[i]), []).append(i)
                for used, group in by_used.items():
                    res = self.gen.generate_batch([batch[i] + self._toks(seqs[i]) for i in group],
                                                  max_length=max_value_tokens - used, sampling_topk=1,
                                                  include_prompt_in_result=False, end_token=self.quote_ends,
                                                  return_scores=True, return_end_token=True, length_penalty=0.0, **kw)
                    for i, r in zip(group, res):
                        seqs[i] += list(r.sequences_ids[0])
                        scores[i] += float(r.scores[0]) if r.scores else 0.0
                todo = [i for i in todo if self._reopened(seqs[i], max_value_tokens)]
            for i in range(n):
                seq = seqs[i]
                value, closed = json_string_value(self.tok.decode(seq, skip_special_tokens=True))
                ok[i] = ok[i] and closed  # else out of tokens (or a stop token) inside the value
                values[i][name] = value
                prefix[i] += json_string_body(value) + '"'
                decoded[i] += len(seq)
                logp[i] += scores[i]
        dt = (time.perf_counter() - t0) / max(1, n)
        out = []
        for i in range(n):
            text = json.dumps(values[i], ensure_ascii=False)
            total = len(self.tok(text, add_special_tokens=False).input_ids)
            out.append({"text": text, "token_ids": None, "finished": ok[i], "seconds": dt,
                        "confidence": _exp(logp[i] / max(1, decoded[i])), "decoded_tokens": decoded[i],
                        "answer_tokens": total})
        return out

    def _reopened(self, seq: list[int], max_value_tokens: int) -> bool:
        """Generation stopped at a token holding a quote that does not end the value (``\\"``), tokens left."""
        if not seq or len(seq) >= max_value_tokens:
            return False
        last = self.tok.convert_ids_to_tokens(seq[-1])
        return ('"' in last and last not in self.stop
                and not json_string_value(self.tok.decode(seq, skip_special_tokens=True))[1])

    def stream(self, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.0, seed: int | None = None):
        """(token id, log-prob) as decoded; the stop token ends the stream and is not yielded."""
        stop_ids = set(self.tok.convert_tokens_to_ids(self.stop))
        kw = {"sampling_topk": 1} if not temperature else {"sampling_temperature": temperature, "sampling_topk": 0,
                                                           "sampling_topp": 1.0}
        if seed is not None:
            kw["sampling_seed"] = seed
        for step in self.gen.generate_tokens(self._toks(prompt), max_length=max_new_tokens, end_token=self.stop,
                                             return_log_prob=True, **kw):
            if step.token_id in stop_ids:
                return
            yield step.token_id, float(step.log_prob or 0.0)


def _exp(x: float) -> float:
    import math

    return math.exp(max(-50.0, min(0.0, float(x))))


# What ``student.runtime: auto`` tries, in order: the first one installed that can run the model is used.
# onnxruntime-genai first: on the parcel bench (bench/genstudent.py, README "genstudent"; SmolLM2-135M, 50 gold
# items, 2 shared cores), float32 and schema-constrained, it answered every item as transformers does in
# 2312 / 2396 ms p50 against CTranslate2's 2858 / 3448 ms in the same two runs (prefix KV reuse, forced tokens
# appended to one cache, exact prompt-lookup drafts: 22 forward passes for 34 decoded tokens; CTranslate2
# re-prefills each field).
# It needs head sizes that are multiples of 16 (ortgenai_problem); CTranslate2 runs the rest.
AUTO_ORDER = ("ortgenai", "ctranslate2")
RUNTIMES = ("auto", "ortgenai", "ctranslate2", "transformers")


def runtime_available(runtime: str) -> bool:
    from protege.students.ortgenai_build import ortgenai_available

    return {"ctranslate2": ctranslate2_available, "ortgenai": ortgenai_available}[runtime]()


def pick_runtime(runtime: str, student_dir: str | Path | None = None) -> str | None:
    """The runtime a student's ``runtime`` setting resolves to here (None = transformers). ``auto`` skips a runtime
    that is not installed or cannot run the model in ``student_dir``; a named one raises (ImportError / ValueError)."""
    from protege.students.ortgenai_build import ortgenai_problem

    if runtime not in RUNTIMES:
        raise ValueError(f"student.runtime {runtime!r}: expected one of {RUNTIMES}")
    if runtime == "transformers":
        return None
    problem = {"ortgenai": ortgenai_problem, "ctranslate2": lambda _: None}
    if runtime == "auto":
        return next((r for r in AUTO_ORDER if runtime_available(r)
                     and (student_dir is None or problem[r](student_dir) is None)), None)
    if not runtime_available(runtime):
        pkg = {"ctranslate2": "ctranslate2", "ortgenai": "onnxruntime-genai"}[runtime]
        raise ImportError(f"student.runtime: {pkg} is not installed: pip install 'protege[fast]' "
                          f"(or set student.runtime: transformers)")
    why = problem[runtime](student_dir) if student_dir is not None else None
    if why:
        raise ValueError(f"student.runtime {runtime}: {why}; use student.runtime: auto or ctranslate2")
    return runtime


def convert_for(student_dir: str | Path, runtime: str, compute_type: str = "float32") -> Path | None:
    """Convert a saved student folder for the runtime its settings resolve to (cached; None = transformers)."""
    rt = pick_runtime(runtime, student_dir)
    if rt == "ortgenai":
        from protege.students.ortgenai_build import convert as convert_ortgenai

        return convert_ortgenai(student_dir, compute_type)
    if rt == "ctranslate2":
        _check_ct2(compute_type)
        return convert(student_dir, compute_type)
    return None


def _check_ct2(compute_type: str) -> None:
    if compute_type not in COMPUTE_TYPES:
        raise ValueError(f"student.compute_type {compute_type!r}: ctranslate2 takes one of {COMPUTE_TYPES}")


def fast_decoder(student_dir: str | Path, tokenizer, runtime: str = "auto", compute_type: str = "float32"):
    """The fast decoder a student folder asks for: ``auto`` = the first of :data:`AUTO_ORDER` installed, else None
    (transformers); ``ortgenai`` / ``ctranslate2`` = that one, required; ``transformers`` = None."""
    rt = pick_runtime(runtime, student_dir)
    if rt == "ortgenai":
        from protege.students.ortgenai_lm import ortgenai_decoder

        return ortgenai_decoder(student_dir, tokenizer, compute_type)
    if rt == "ctranslate2":
        _check_ct2(compute_type)
        return CT2Decoder(convert(student_dir, compute_type), tokenizer, compute_type)
    return None

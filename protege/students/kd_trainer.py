"""Trainers that put a distillation loss into the transformers / TRL training loops.

Why subclasses of ``Trainer`` / ``SFTTrainer`` rather than loops of our own: the trainers bring
accelerate with them (DDP, DeepSpeed ZeRO, FSDP, mixed precision, gradient accumulation, checkpoints),
so ``accelerate launch -m protege.cli train task.yaml`` runs the same code on many GPUs. Each trainer
only overrides ``compute_loss`` with a pure function from :mod:`protege.losses`; nothing here assumes
one process (the teacher is placed with ``accelerator.prepare_model`` / TRL's ``prepare_deepspeed``,
token counts are the Trainer's global ``num_items_in_batch``).

* :class:`ClassifierKDTrainer` — sequence classification: Hinton KD on the teacher's label
  distribution mixed with hard labels (``distillation_loss``), class and sample weights.
* :class:`TokenKDTrainer` — causal LM: TRL SFT (completion-only cross-entropy) plus token-level KD,
  either against a local teacher's full logits (generalized JSD, TRL's GKD convention) or against
  stored top-k log-probs of an API teacher (``topk_kl``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

from protege.losses import distillation_loss, generalized_jsd, topk_kl
from protege.progress import bar

__all__ = ["ClassifierKDTrainer", "ClassifierKDCollator", "TokenKDTrainer", "TokenKDCollator", "RichProgress",
           "quiet_trainer", "token_kd_loss", "completion_logits", "trained_model"]


# -- progress ------------------------------------------------------------------------------------

class RichProgress(TrainerCallback):
    """The project's Rich bar instead of tqdm; drawn by the main process only."""

    def __init__(self, description: str):
        self.description, self._cm, self._advance, self._loss = description, None, None, None

    def on_train_begin(self, args, state, control, **kw):
        if state.is_world_process_zero:
            self._cm = bar(self.description, state.max_steps)
            self._advance = self._cm.__enter__()

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self._loss = logs["loss"]

    def on_step_end(self, args, state, control, **kw):
        if self._advance is not None:
            self._advance(1, **({"loss": f"{self._loss:.4f}"} if self._loss is not None else {}))

    def on_train_end(self, args, state, control, **kw):
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = self._advance = None


def quiet_trainer(trainer: Trainer, description: str) -> Trainer:
    """Swap the Trainer's tqdm bar / log printer for one Rich bar (TrainingArguments(disable_tqdm=True))."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(RichProgress(description))
    return trainer


def trained_model(trainer: Trainer, auto_cls):
    """The trained model as an ordinary module on the main process.

    Under DeepSpeed ZeRO-3 or FSDP every rank holds a shard of the weights, so reading ``trainer.model``
    on rank 0 would save empty tensors. The Trainer's own ``save_model`` gathers a full copy (a
    collective every rank must join; ZeRO-3 needs ``zero3_save_16bit_model: true``) which rank 0 reads
    back with ``auto_cls``. Under DDP / one process the model is simply unwrapped.
    """
    if not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled):
        return trainer.model
    from protege.students.distributed import is_main_process, wait_for_everyone

    full = Path(trainer.args.output_dir) / "protege-full-model"
    trainer.save_model(str(full))
    wait_for_everyone()
    return auto_cls.from_pretrained(full, dtype=torch.float32) if is_main_process() else trainer.model


def refuse_sharded_lora(trainer: Trainer) -> None:
    """LoRA + ZeRO-3 / FSDP: merging adapters into sharded base weights is not supported here."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if trainer.is_fsdp_enabled or (plugin is not None and getattr(plugin, "zero_stage", 0) == 3):
        raise ValueError("LoRA students with ZeRO-3 / FSDP are not supported: the adapters are small, so use DDP or "
                         "DeepSpeed ZeRO-2 (or a full fine-tune under ZeRO-3 / FSDP)")


# -- classification ------------------------------------------------------------------------------

@dataclass
class ClassifierKDCollator:
    """Pad token fields with the tokenizer; stack teacher probabilities, hard labels, sample weights."""

    tokenizer: Any

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in rows[0]]
        batch = self.tokenizer.pad([{k: r[k] for k in keys} for r in rows], return_tensors="pt")
        batch = dict(batch)
        batch["teacher_probs"] = torch.tensor([r["teacher_probs"] for r in rows], dtype=torch.float32)
        batch["hard_labels"] = torch.tensor([r["hard_labels"] for r in rows], dtype=torch.long)
        if "sample_weight" in rows[0]:
            batch["sample_weight"] = torch.tensor([r["sample_weight"] for r in rows], dtype=torch.float32)
        return batch


class ClassifierKDTrainer(Trainer):
    """``Trainer`` whose loss is :func:`protege.losses.distillation_loss`.

    Batches carry ``teacher_probs`` [B, C], ``hard_labels`` [B] and optionally ``sample_weight`` [B];
    pass ``label_names=["teacher_probs"]`` in the TrainingArguments so evaluation hands the teacher's
    distribution to ``compute_metrics`` (agreement with the teacher on a dev split).
    """

    def __init__(self, *args, alpha: float = 0.5, temperature: float = 2.0,
                 class_weights: torch.Tensor | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha, self.temperature, self.class_weights = alpha, temperature, class_weights

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)  # the Trainer reads label_names from the original dict after this call
        probs = inputs.pop("teacher_probs")
        hard = inputs.pop("hard_labels", None)
        weight = inputs.pop("sample_weight", None)
        out = model(**inputs)
        loss = distillation_loss(out.logits, probs, hard, alpha=self.alpha, temperature=self.temperature,
                                 class_weights=self.class_weights, sample_weight=weight)
        return (loss, out) if return_outputs else loss


# -- causal LM -----------------------------------------------------------------------------------

def _pad(seqs: list[list], value, dtype=torch.long) -> torch.Tensor:
    n = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), n), value, dtype=dtype)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, : len(s)] = torch.as_tensor(s, dtype=dtype)
    return out


@dataclass
class TokenKDCollator:
    """Right-pad student (and optional teacher) sequences; lay top-k rows onto the label positions.

    Rows come from SFTTrainer's prepared dataset: ``input_ids`` and ``labels`` (prompt tokens -100).
    Optional columns: ``teacher_input_ids`` + ``teacher_completion_mask`` (the teacher's own prompt
    around the same completion tokens) and ``topk_ids`` / ``topk_logprobs`` ([n, k], one row per
    completion token, in order). Top-k rows are returned as [B, L, k] tensors aligned with ``labels``
    plus a ``topk_mask`` [B, L]; padded candidates get log-prob ``-inf`` (probability 0).
    """

    pad_token_id: int
    teacher_pad_token_id: int | None = None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids = [r["input_ids"] for r in rows]
        labels = [r["labels"] for r in rows]
        out = {"input_ids": _pad(ids, self.pad_token_id), "attention_mask": _pad([[1] * len(s) for s in ids], 0),
               "labels": _pad(labels, -100)}
        if rows[0].get("sample_weight") is not None:
            out["sample_weight"] = torch.tensor([float(r["sample_weight"]) for r in rows], dtype=torch.float32)
        if rows[0].get("teacher_input_ids") is not None:
            t_ids = [r["teacher_input_ids"] for r in rows]
            t_lab = [[t if m else -100 for t, m in zip(r["teacher_input_ids"], r["teacher_completion_mask"])]
                     for r in rows]
            pad = self.pad_token_id if self.teacher_pad_token_id is None else self.teacher_pad_token_id
            out.update(teacher_input_ids=_pad(t_ids, pad),
                       teacher_attention_mask=_pad([[1] * len(s) for s in t_ids], 0), teacher_labels=_pad(t_lab, -100))
        if rows[0].get("topk_ids") is not None:
            B, L = out["labels"].shape
            k = max((len(r) for row in rows for r in (row["topk_ids"] or [])), default=1)
            k_ids = torch.zeros((B, L, k), dtype=torch.long)
            k_lp = torch.full((B, L, k), float("-inf"), dtype=torch.float32)
            k_mask = torch.zeros((B, L), dtype=torch.bool)
            for b, row in enumerate(rows):
                pos = (out["labels"][b] != -100).nonzero().flatten().tolist()
                for j, (cand, lps) in enumerate(zip(row["topk_ids"] or [], row["topk_logprobs"] or [])):
                    if j >= len(pos) or not cand:
                        break
                    p, first = pos[j], int(cand[0])
                    # padding candidates (none, or id -1 in stored files) repeat a real id with probability 0
                    k_ids[b, p, :] = first
                    k_ids[b, p, : len(cand)] = torch.as_tensor([int(c) if c >= 0 else first for c in cand])
                    lp_row = torch.as_tensor(lps, dtype=torch.float32)
                    k_lp[b, p, : len(lps)] = torch.where(torch.as_tensor(cand[: len(lps)]) >= 0, lp_row, -math.inf)
                    k_mask[b, p] = True
            out.update(topk_ids=k_ids, topk_logprobs=k_lp, topk_mask=k_mask)
        return out


def _sft_trainer_cls():
    from trl import SFTTrainer

    return SFTTrainer


def token_kd_loss(logits: torch.Tensor, labels: torch.Tensor, *, alpha: float, kd: str, beta: float = 0.5,
                  temperature: float = 1.0, teacher_logits: torch.Tensor | None = None,
                  teacher_labels: torch.Tensor | None = None, topk: tuple | None = None,
                  vocab_size: int | None = None, num_items: int | torch.Tensor | None = None,
                  row_weight: torch.Tensor | None = None) -> dict:
    """SFT cross-entropy on completion tokens mixed with a token-level KD term. Pure: tensors in, losses out.

    ``logits`` [B, L, V] and ``labels`` [B, L] (-100 = not trained) are unshifted, as a causal LM
    returns them. ``kd``: "none" (CE only), "logits" (``generalized_jsd`` against ``teacher_logits``
    read at the positions where ``teacher_labels`` != -100 — the same completion tokens, possibly
    behind a different prompt), or "topk" (``topk_kl`` against ``topk = (ids, logprobs, mask)``, each
    aligned with ``labels``). Both terms are sums over completion tokens divided by ``num_items`` (the
    Trainer's token count over the whole accumulated, all-rank batch) or by this batch's count.
    ``row_weight`` [B] multiplies every token term of its sequence (real labelled rows above teacher
    rows); the denominator stays the token count, so all-ones weights change nothing.
    Returns ``{"loss", "ce", "kd"}``.
    """
    s_logits, tgt = logits[:, :-1], labels[:, 1:]
    mask = tgt != -100
    denom = torch.as_tensor(mask.sum() if num_items is None else num_items, device=logits.device).clamp(min=1)
    rows = s_logits[mask].float()
    if vocab_size is not None:
        rows = rows[..., :vocab_size]

    def wsum(per_token: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Sum of per-token terms at the ``where`` positions, each times its row's weight."""
        if row_weight is None:
            return per_token.sum()
        w = row_weight.to(per_token)[:, None].expand(where.shape)[where]
        return (per_token * w).sum()

    ce = wsum(F.cross_entropy(rows, tgt[mask], reduction="none"), mask) / denom
    kd_term = torch.zeros((), device=logits.device)
    if kd == "logits" and alpha > 0:
        if teacher_logits is None:
            raise ValueError("kd='logits' needs teacher_logits")
        t_lab = labels if teacher_labels is None else teacher_labels
        t_rows = teacher_logits[:, :-1][t_lab[:, 1:] != -100].float()
        if vocab_size is not None:
            t_rows = t_rows[..., :vocab_size]
        if t_rows.shape != rows.shape:
            raise ValueError(f"teacher gives {tuple(t_rows.shape)} completion logits, student {tuple(rows.shape)}: "
                             f"the two prompts must wrap the same completion tokens and vocabularies must match")
        kd_term = wsum(generalized_jsd(rows, t_rows, beta=beta, temperature=temperature, reduction="none").sum(-1),
                       mask) / denom
    elif kd == "topk" and alpha > 0:
        if topk is None:
            raise ValueError("kd='topk' needs topk=(ids, logprobs, mask)")
        k_ids, k_lp, k_mask = (t[:, 1:] for t in topk)
        if k_mask.any():
            k_rows = s_logits[k_mask].float()
            if vocab_size is not None:
                k_rows = k_rows[..., :vocab_size]
            kd_term = wsum(topk_kl(k_rows, k_ids[k_mask], k_lp[k_mask], temperature=temperature, reduction="none"),
                           k_mask) / denom
    if kd == "none" or alpha == 0:
        loss = ce
    else:
        loss = (1 - alpha) * ce + alpha * kd_term
    return {"loss": loss, "ce": ce.detach(), "kd": kd_term.detach()}


def completion_logits(model, input_ids, attention_mask, labels):
    """Forward pass that projects only from the first position predicting a completion token onwards.

    The LM head over a 50k-token vocabulary costs about as much as the whole 135M-parameter body for one
    position; prompt positions carry no loss, so ``logits_to_keep`` skips them (padding is on the right,
    so "from the earliest completion in the batch to the end" covers every trained position). Returns
    (outputs, start): ``outputs.logits`` covers positions ``start..L-1``.
    """
    L = labels.shape[1]
    has = (labels != -100).any(0)
    first = int(has.nonzero()[0]) if has.any() else L - 1
    start = max(first - 1, 0)
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=L - start)
    except TypeError:  # a model without logits_to_keep: full logits
        out, start = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False), 0
    if out.logits.shape[1] != L - start:  # logits_to_keep ignored
        start = L - out.logits.shape[1]
    return out, start


def TokenKDTrainer(*args, **kwargs):
    """Build a :class:`_TokenKDTrainer` (an ``SFTTrainer``); a function so that ``trl`` loads lazily."""
    return _token_kd_trainer_class()(*args, **kwargs)


_CLS: dict[str, type] = {}


def _token_kd_trainer_class() -> type:
    if "cls" in _CLS:
        return _CLS["cls"]
    SFTTrainer = _sft_trainer_cls()

    class _TokenKDTrainer(SFTTrainer):
        """TRL ``SFTTrainer`` (completion-only loss on a prepared dataset) plus a token KD term.

        ``teacher_model`` (kd="logits") is frozen and placed like TRL's GKD trainer does: through
        ``prepare_deepspeed`` under DeepSpeed (ZeRO-3 shards it too), else ``accelerator.prepare_model``
        in evaluation mode (FSDP wraps it; DDP leaves it replicated).
        """

        def __init__(self, *a, teacher_model=None, alpha: float = 0.5, beta: float = 0.5,
                     temperature: float = 1.0, kd: str = "none", vocab_size: int | None = None,
                     vocab_map: torch.Tensor | None = None, **kw):
            super().__init__(*a, **kw)
            self.alpha, self.beta, self.temperature, self.kd = alpha, beta, temperature, kd
            self.vocab_size, self.vocab_map = vocab_size, vocab_map
            self.teacher = None
            if teacher_model is not None:
                teacher_model.eval()
                teacher_model.requires_grad_(False)
                if self.is_deepspeed_enabled:
                    from trl.models import prepare_deepspeed

                    self.teacher = prepare_deepspeed(teacher_model, self.accelerator)
                else:
                    self.teacher = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            labels = labels_full = inputs.pop("labels")
            t_ids = inputs.pop("teacher_input_ids", None)
            t_att = inputs.pop("teacher_attention_mask", None)
            t_lab = inputs.pop("teacher_labels", None)
            topk = [inputs.pop(k, None) for k in ("topk_ids", "topk_logprobs", "topk_mask")]
            row_weight = inputs.pop("sample_weight", None)
            out, start = completion_logits(model, inputs["input_ids"], inputs["attention_mask"], labels)
            labels = labels[:, start:]
            topk = [None if t is None else t[:, start:] for t in topk]
            t_logits = None
            if self.kd == "logits" and self.alpha > 0:
                if self.teacher is None:
                    raise ValueError("kd='logits' needs a teacher_model")
                if t_ids is None:
                    t_ids, t_att, t_lab = inputs["input_ids"], inputs["attention_mask"], labels_full
                with torch.no_grad():
                    t_out, t_start = completion_logits(self.teacher, t_ids, t_att, t_lab)
                t_logits, t_lab = t_out.logits, t_lab[:, t_start:]
                if self.vocab_map is not None:
                    t_logits = t_logits.index_select(-1, self.vocab_map.to(t_logits.device))
            res = token_kd_loss(out.logits, labels, alpha=self.alpha, kd=self.kd, beta=self.beta,
                                temperature=self.temperature, teacher_logits=t_logits, teacher_labels=t_lab,
                                topk=tuple(topk) if topk[0] is not None else None, vocab_size=self.vocab_size,
                                num_items=num_items_in_batch, row_weight=row_weight)
            loss = res["loss"]
            # like Trainer / SFTTrainer: num_items_in_batch counts every rank's tokens and DDP averages gradients
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            mode = "train" if model.training else "eval"
            for k in ("ce", "kd"):
                self._metrics[mode][f"{k}_loss"].append(self.accelerator.gather_for_metrics(res[k]).mean().item())
            return (loss, out) if return_outputs else loss

    _CLS["cls"] = _TokenKDTrainer
    return _TokenKDTrainer

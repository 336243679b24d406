"""Distillation losses: pure functions on logits tensors.

Conventions (shared by every function unless its docstring says otherwise):

* The last dimension is the class / vocabulary dimension; any leading dims
  (``(B, C)`` for classification, ``(B, T, V)`` for language models) are
  "rows".  One row = one distribution to match.
* ``temperature`` T divides the logits before the softmax.  The KL / CE losses
  multiply by ``T**2`` (Hinton et al., 2015) so that gradient magnitudes stay
  comparable across temperatures and alpha-mixing with a hard loss is stable.
  ``generalized_jsd`` is the exception: it mirrors TRL, which does *not* scale.
* ``labels`` (same shape as the leading dims) masks rows where
  ``labels == ignore_index``: they contribute nothing, and "batchmean" divides
  by the number of *unmasked* rows (clamped to >= 1, so an all-masked batch
  gives 0 with a valid gradient instead of 0/0 = NaN).
* ``reduction``: "batchmean" and "mean" = sum over rows / number of counted
  rows (torch's elementwise "mean" over the vocab is almost never what a
  distillation loss wants, so "mean" is per-row here); "sum"; "none" returns
  the per-row tensor (masked rows are 0).
* Numerics: everything goes through ``log_softmax``; a term ``p * (log p -
  log q)`` with ``p == 0`` is exactly 0 (double ``torch.where`` so neither the
  value nor the gradient sees ``0 * -inf``).  Teachers with ``-inf`` logits
  (banned tokens) and logits like +-1e4 therefore give finite losses and
  finite gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "soft_cross_entropy",
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "topk_kl",
    "distillation_loss",
]

_REDUCTIONS = ("batchmean", "mean", "sum", "none")


def _check(temperature: float, reduction: str) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _floor(t: torch.Tensor) -> float:
    """log of the smallest normal float: stand-in for log(0) where a KL would be +inf."""
    return math.log(torch.finfo(t.dtype).tiny)


def _xlogx_minus(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Elementwise ``p * (log p - log q)`` with ``p == 0`` terms exactly 0.

    ``log q == -inf`` where ``p > 0`` (a support mismatch, KL = +inf in exact
    arithmetic) is replaced by log(tiny) so training gets a large but finite
    penalty and a useful gradient instead of inf/NaN.
    """
    p = logp.exp()
    live = p > 0
    logq = torch.where(torch.isneginf(logq), _floor(logq), logq)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    return p * (torch.where(live, logp, zero) - torch.where(live, logq, zero))


def _reduce_rows(rows: torch.Tensor, labels, ignore_index: int, reduction: str) -> torch.Tensor:
    """Mask and reduce a per-row loss tensor (shape = leading dims)."""
    if labels is not None:
        if labels.shape != rows.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != leading dims {tuple(rows.shape)}")
        mask = labels != ignore_index
        rows = torch.where(mask, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
        count = mask.sum().clamp_min(1)
    else:
        count = max(rows.numel(), 1)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / count  # "batchmean" and "mean": per unmasked row


def soft_cross_entropy(student_logits, teacher_logits, temperature=1.0, reduction="batchmean",
                       *, labels=None, ignore_index=-100):
    """Hinton KD soft-target loss: ``-T^2 * sum softmax(t/T) * log_softmax(s/T)``.

    Equals ``forward_kl`` plus the teacher entropy (a constant w.r.t. the
    student), so gradients are identical; this is the form most papers quote
    and what ``distillation_loss`` uses.
    """
    _check(temperature, reduction)
    logq = F.log_softmax(student_logits / temperature, dim=-1)
    logp = F.log_softmax(teacher_logits / temperature, dim=-1)
    p = logp.exp()
    logq = torch.where(torch.isneginf(logq), _floor(logq), logq)
    rows = -torch.where(p > 0, p * logq, torch.zeros((), dtype=p.dtype, device=p.device)).sum(-1)
    return _reduce_rows(rows * temperature**2, labels, ignore_index, reduction)


def forward_kl(student_logits, teacher_logits, temperature=1.0, labels=None,
               ignore_index=-100, reduction="batchmean"):
    """``T^2 * KL(p_teacher || p_student)``: mode-covering; the classic KD loss.

    Unlike torchtune's ``ForwardKLLoss`` (which returns the cross-entropy and
    so differs by the teacher entropy), this is the true KL: 0 when the
    student matches the teacher.
    """
    _check(temperature, reduction)
    logq = F.log_softmax(student_logits / temperature, dim=-1)
    logp = F.log_softmax(teacher_logits / temperature, dim=-1)
    rows = _xlogx_minus(logp, logq).sum(-1)
    return _reduce_rows(rows * temperature**2, labels, ignore_index, reduction)


def reverse_kl(student_logits, teacher_logits, temperature=1.0, labels=None,
               ignore_index=-100, reduction="batchmean"):
    """``T^2 * KL(p_student || p_teacher)``: mode-seeking (MiniLLM / on-policy KD).

    Teacher log-probs are floored at log(finfo.tiny) (~ -87 in fp32): where the
    teacher gives probability 0 (``-inf`` logit) the exact reverse KL is +inf
    for any student with finite logits.  Dropping such terms (torchtune's
    choice) would make "all mass on banned tokens" a zero-loss optimum; the
    floor instead gives a large, finite, monotone penalty.  Values only change
    where the teacher probability underflows the dtype anyway.
    """
    _check(temperature, reduction)
    logq = F.log_softmax(student_logits / temperature, dim=-1)
    logp = F.log_softmax(teacher_logits / temperature, dim=-1).clamp_min(_floor(student_logits))
    rows = _xlogx_minus(logq, logp).sum(-1)
    return _reduce_rows(rows * temperature**2, labels, ignore_index, reduction)


def generalized_jsd(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                    reduction="batchmean", num_items_in_batch=None):
    """Generalized JSD, same convention as TRL ``GKDTrainer.generalized_jsd_loss``.

    Follows TRL (trl 1.16, ``trl.experimental.gkd``) exactly, so losses are
    comparable with GKD runs:

    * logits divided by T, **no** ``T^2`` scaling;
    * ``beta == 0`` -> KL(teacher || student) (forward), ``beta == 1`` ->
      KL(student || teacher) (reverse); otherwise with mixture
      ``m = beta * p_t + (1 - beta) * p_s``:
      ``beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)``.  (So beta -> 0 does
      *not* tend to the beta == 0 value; that discontinuity is TRL's.)
    * masking uses ``labels == -100`` (hard-coded, as TRL does);
    * reductions are over the *elementwise* (..., V) tensor, as in TRL:
      "batchmean" = sum / #unmasked tokens if labels are given, else sum /
      ``size(0)`` (the batch size, not B*T); "mean" = elementwise mean; "none"
      returns the elementwise tensor (``[mask]``-selected, shape (N, V), if
      labels are given); ``num_items_in_batch`` overrides the divisor.

    Only deviation: TRL returns NaN/inf for ``-inf`` teacher logits; here
    ``p == 0`` terms are 0 and the beta == 1 branch floors teacher log-probs
    like ``reverse_kl``.  Identical for all finite, non-underflowing inputs.
    """
    _check(temperature, reduction)
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = _xlogx_minus(t, s)
    elif beta == 1:
        jsd = _xlogx_minus(s, t.clamp_min(_floor(t)))
    else:
        m = torch.logsumexp(torch.stack([s + math.log1p(-beta), t + math.log(beta)]), dim=0)
        jsd = beta * _xlogx_minus(t, m) + (1 - beta) * _xlogx_minus(s, m)
    mask = None
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(jsd.device)
        return jsd.sum() / num_items_in_batch
    if reduction == "batchmean":
        denom = mask.sum().clamp_min(1) if mask is not None else max(jsd.size(0), 1)
        return jsd.sum() / denom
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


def topk_kl(student_logits, teacher_topk_ids, teacher_topk_logprobs, temperature=1.0,
            labels=None, ignore_index=-100, reduction="batchmean"):
    """Forward KL against a teacher known only through its top-k log-probs.

    API teachers (OpenAI-style ``top_logprobs``) return k (id, logprob) pairs
    per position.  Both distributions are collapsed onto k + 1 buckets: the k
    ids plus a "rest" bucket.  Teacher rest = ``max(0, 1 - sum exp(lp))``;
    student rest = the student's mass outside the k ids (log-sum-exp of the
    other logits, so it is exact and differentiable).  If the ids cover the
    whole vocabulary the rest bucket is dropped (its teacher mass is only
    rounding error), which makes k == V identical to ``forward_kl``.

    Temperature: student logits are divided by T as usual.  Teacher logprobs
    are taken as given at T = 1; for T != 1 the k + 1 bucket log-masses
    (rest treated as one pseudo-token) are divided by T and renormalised.
    This is exact for the k ids' relative odds; for the rest bucket it is an
    approximation (the true tempered tail is unknowable from top-k).  The
    bucket distribution is always renormalised, which also absorbs API
    rounding where the k probabilities sum slightly above 1.  Scaled by T^2.
    Ids are assumed distinct within a row.
    """
    _check(temperature, reduction)
    ids = teacher_topk_ids.long()
    lp = teacher_topk_logprobs.to(student_logits.dtype)
    logq_full = F.log_softmax(student_logits / temperature, dim=-1)
    in_topk = torch.zeros_like(logq_full, dtype=torch.bool).scatter(-1, ids, True)
    covered = in_topk.all(-1, keepdim=True)
    neg_inf = torch.full((), float("-inf"), dtype=logq_full.dtype, device=logq_full.device)
    q_rest = torch.logsumexp(torch.where(in_topk, neg_inf, logq_full), dim=-1, keepdim=True)
    logq = torch.cat([logq_full.gather(-1, ids), q_rest], dim=-1)
    # teacher rest mass 1 - sum p, computed as -expm1(logsumexp) for precision
    rest = (-torch.expm1(torch.logsumexp(lp, dim=-1, keepdim=True).clamp_max(0))).clamp_min(0)
    p_rest = torch.where(covered, neg_inf, rest.log())
    logp = F.log_softmax(torch.cat([lp, p_rest], dim=-1) / temperature, dim=-1)
    rows = _xlogx_minus(logp, logq).sum(-1)
    return _reduce_rows(rows * temperature**2, labels, ignore_index, reduction)


def distillation_loss(student_logits, teacher_probs, hard_labels=None, alpha=0.5,
                      temperature=2.0, class_weights=None, sample_weight=None):
    """Classification KD objective (Hinton et al., 2015).

    ``alpha * T^2 * softCE(s/T, p_teacher^(1/T) renormalised)
    + (1 - alpha) * CE(s, hard_labels, weight=class_weights)``.

    Teachers (API or local) hand us probabilities, not logits; tempering a
    probability vector is ``softmax(log p / T)`` (= p^(1/T) renormalised), so
    zero probabilities become ``-inf`` log-odds and stay exactly 0 - no NaN.
    Without ``hard_labels`` the teacher's argmax is used as the hard target
    (self-training on teacher labels).  alpha = 1 / 0 skip the unused term
    entirely.  Both terms are means over rows (the hard term follows
    ``F.cross_entropy``: weighted mean when ``class_weights`` is given,
    ``-100`` labels ignored).  ``sample_weight`` (one weight per row, e.g. real
    labelled data weighted above teacher labels) turns both means into
    weighted means over rows.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if sample_weight is not None:
        w = sample_weight.to(student_logits).reshape(-1)
        rows = student_logits.new_zeros(student_logits.shape[:-1]).reshape(-1)
        if alpha > 0:
            t_logits = torch.log(teacher_probs.to(student_logits.dtype))
            rows = rows + alpha * soft_cross_entropy(student_logits, t_logits, temperature, reduction="none").reshape(-1)
        if alpha < 1:
            if hard_labels is None:
                hard_labels = teacher_probs.argmax(-1)
            weight = None if class_weights is None else class_weights.to(student_logits)
            hard = F.cross_entropy(student_logits.reshape(-1, student_logits.size(-1)), hard_labels.reshape(-1).long(),
                                   weight=weight, reduction="none")
            rows = rows + (1 - alpha) * hard
        return (rows * w).sum() / w.sum().clamp_min(1e-12)
    loss = student_logits.new_zeros(())
    if alpha > 0:
        teacher_logits = torch.log(teacher_probs.to(student_logits.dtype))
        loss = loss + alpha * soft_cross_entropy(student_logits, teacher_logits, temperature)
    if alpha < 1:
        if hard_labels is None:
            hard_labels = teacher_probs.argmax(-1)
        num_classes = student_logits.size(-1)
        weight = None if class_weights is None else class_weights.to(student_logits)
        hard = F.cross_entropy(student_logits.reshape(-1, num_classes), hard_labels.reshape(-1).long(),
                               weight=weight)
        loss = loss + (1 - alpha) * hard
    return loss

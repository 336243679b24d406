"""One convex linear head on precomputed features, the fit every ladder rung shares.

``logits = (dense_weight · X) · W + S · V + b`` with ``X`` dense features (static embedding mean, a frozen
sentence-encoder embedding) and ``S`` sparse TF-IDF n-grams, fitted on the KD loss
(:func:`protege.losses.distillation_loss`: tempered soft teacher labels mixed with hard labels by ``alpha``)
plus an L2 penalty ``1/(2·C·n)`` by full-batch L-BFGS — the same objective
:meth:`protege.students.classifier.StaticClassifier.fit` solves, taken out of the class so cross-validation
computes the features of a fold once and refits only this head per setting.

Class balance is a per-row weight ``n / (k · count(label))`` on *both* loss terms (scikit-learn's
``class_weight="balanced"`` as sample weights), so the soft term cannot learn the prior back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Head:
    """Fitted weights: ``W`` already multiplied by ``dense_weight`` (apply it to raw ``X``)."""

    W: np.ndarray
    V: np.ndarray
    b: np.ndarray

    def logits(self, X: np.ndarray | None, S=None) -> np.ndarray:
        z = np.broadcast_to(self.b, (X.shape[0] if X is not None else S.shape[0], len(self.b))).copy()
        if X is not None and self.W.size:
            z += X @ self.W
        if S is not None and self.V.size:
            z += S @ self.V
        return z


def balanced_weights(hard: np.ndarray, k: int) -> np.ndarray:
    """Per-row weights ``n / (k · count)`` of each row's label (mean 1 over the rows)."""
    counts = np.bincount(hard, minlength=k).astype(np.float64)
    per_label = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max(int((counts > 0).sum()), 1), 0.0)
    return per_label[hard].astype(np.float32)


def fit_head(X: np.ndarray | None, S, P: np.ndarray, hard: np.ndarray, *, c: float = 10.0, dense_weight: float = 1.0,
             balanced: bool = False, sample_weight: np.ndarray | None = None, alpha: float = 0.5,
             temperature: float = 2.0, max_iter: int = 200, seed: int = 0) -> Head:
    """Fit the head; ``X`` [n, d] or None, ``S`` scipy sparse [n, v] or None, ``P`` [n, k] teacher probs."""
    import torch

    from protege.losses import distillation_loss

    torch.manual_seed(seed)
    P = np.asarray(P, dtype=np.float32)
    n, k = P.shape
    w = np.ones(n, dtype=np.float32) if sample_weight is None else np.asarray(sample_weight, dtype=np.float32)
    if balanced:
        w = w * balanced_weights(np.asarray(hard), k)
    Xt = torch.tensor(np.asarray(X, dtype=np.float32) * dense_weight) if X is not None else None
    St = _torch_sparse(S) if S is not None and S.shape[1] else None
    Pt, yt = torch.tensor(P), torch.tensor(np.asarray(hard), dtype=torch.long)
    wt = None if np.all(w == 1.0) else torch.tensor(w)
    W = torch.zeros(Xt.shape[1] if Xt is not None else 0, k, requires_grad=True)
    V = torch.zeros(St.shape[1] if St is not None else 0, k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    lam = 1.0 / (2.0 * c * max(n, 1))
    opt = torch.optim.LBFGS([W, V, b], max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = b.expand(n, k)
        if Xt is not None:
            z = z + Xt @ W
        if St is not None:
            z = z + St @ V
        total = distillation_loss(z, Pt, yt, alpha=alpha, temperature=temperature, sample_weight=wt)
        total = total + lam * ((W * W).sum() + (V * V).sum())
        total.backward()
        return total

    opt.step(closure)
    return Head(np.ascontiguousarray(W.detach().numpy() * dense_weight, dtype=np.float32),
                np.ascontiguousarray(V.detach().numpy(), dtype=np.float32), b.detach().numpy().astype(np.float32))


def _torch_sparse(X):
    import torch

    X = X.tocoo().astype(np.float32)
    idx = torch.from_numpy(np.vstack([X.row, X.col]).astype(np.int64))
    return torch.sparse_coo_tensor(idx, torch.from_numpy(X.data), size=X.shape, check_invariants=False).coalesce()

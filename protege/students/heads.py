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
             temperature: float = 2.0, max_iter: int = 200, seed: int = 0, init: Head | None = None) -> Head:
    """Fit the head; ``X`` [n, d] or None, ``S`` scipy sparse [n, v] or None, ``P`` [n, k] teacher probs.

    The loss and its gradient are written out (the gradient of :func:`~protege.losses.distillation_loss` in the
    logits is ``alpha·T·(softmax(z/T) − p_T) + (1 − alpha)·(softmax(z) − onehot(y))`` per row; a test checks the
    two agree) and minimised by torch's L-BFGS (strong Wolfe) on one flat float32 parameter vector whose gradient the
    closure sets: a SciPy CSR product and its transpose per evaluation instead of autograd through a sparse COO
    tensor. ``init`` warm-starts from another head with the same shapes (the next C of a grid path)."""
    import scipy.sparse as sp
    import torch

    del seed  # deterministic: zeros (or ``init``) start, full-batch L-BFGS
    P = np.asarray(P, dtype=np.float64)
    n, k = P.shape
    w = np.ones(n, dtype=np.float64) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if balanced:
        w = w * balanced_weights(np.asarray(hard), k)
    w = (w / max(w.sum(), 1e-12)).astype(np.float32)[:, None]
    Xd = np.ascontiguousarray(np.asarray(X, dtype=np.float32) * dense_weight) if X is not None else None
    Sc = sp.csr_matrix(S, dtype=np.float32) if S is not None and S.shape[1] else None
    ScT = Sc.T.tocsr() if Sc is not None else None
    T = float(temperature)
    with np.errstate(divide="ignore"):
        lp = np.log(P) / T
    lp = np.where(np.isfinite(lp), lp, -np.inf)
    pT = np.exp(lp - lp.max(1, keepdims=True))
    pT = (pT / pT.sum(1, keepdims=True)).astype(np.float32)
    onehot = np.zeros((n, k), dtype=np.float32)
    onehot[np.arange(n), np.asarray(hard)] = 1.0
    dx, dv = (Xd.shape[1] if Xd is not None else 0), (Sc.shape[1] if Sc is not None else 0)
    lam = 1.0 / (2.0 * c * max(n, 1))
    sizes = np.cumsum([dx * k, dv * k, k])

    def unpack(theta):
        t = theta.astype(np.float32)
        return t[: sizes[0]].reshape(dx, k), t[sizes[0]: sizes[1]].reshape(dv, k), t[sizes[1]:]

    def f(theta):
        W, V, b = unpack(theta)
        z = np.broadcast_to(b, (n, k)).copy()
        if dx:
            z += Xd @ W
        if dv:
            z += Sc @ V
        G = np.zeros((n, k), dtype=np.float32)
        loss = 0.0
        if alpha > 0:
            zt = z / T
            zt = zt - zt.max(1, keepdims=True)
            lse = np.log(np.exp(zt).sum(1, keepdims=True))
            logq = zt - lse
            loss += alpha * T * T * float(-(w * np.where(pT > 0, pT * logq, 0.0)).sum())
            G += (alpha * T) * (np.exp(logq) - pT)
        if alpha < 1:
            zz = z - z.max(1, keepdims=True)
            logs = zz - np.log(np.exp(zz).sum(1, keepdims=True))
            loss += (1 - alpha) * float(-(w[:, 0] * logs[np.arange(n), np.asarray(hard)]).sum())
            G += (1 - alpha) * (np.exp(logs) - onehot)
        G *= w
        gW = Xd.T @ G + 2 * lam * W if dx else np.zeros((0, k), np.float32)
        gV = ScT @ G + 2 * lam * V if dv else np.zeros((0, k), np.float32)
        loss += lam * (float((W.astype(np.float64) ** 2).sum()) + float((V.astype(np.float64) ** 2).sum()))
        return loss, np.concatenate([gW.ravel(), gV.ravel(), G.sum(0)])

    theta0 = np.zeros(int(sizes[-1]), dtype=np.float32)
    if init is not None and init.W.shape == (dx, k) and init.V.shape == (dv, k):
        Wi = init.W / dense_weight if dense_weight else init.W  # stored W already carries its dense_weight
        theta0 = np.concatenate([Wi.ravel(), init.V.ravel(), init.b.ravel()]).astype(np.float32)
    theta = torch.from_numpy(theta0).requires_grad_(True)
    opt = torch.optim.LBFGS([theta], max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            line_search_fn="strong_wolfe")

    def closure():
        loss, g = f(theta.detach().numpy())
        theta.grad = torch.from_numpy(g.astype(np.float32))
        return torch.tensor(loss, dtype=torch.float32)

    opt.step(closure)
    W, V, b = unpack(theta.detach().numpy())
    return Head(np.ascontiguousarray(W * dense_weight, dtype=np.float32), np.ascontiguousarray(V, dtype=np.float32),
                np.asarray(b, dtype=np.float32))

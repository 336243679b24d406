"""The ladder's convex head: its hand-written gradient matches autograd through ``distillation_loss``, and
warm starts land on the same optimum."""

import numpy as np
import pytest
import scipy.sparse as sp

from protege.students.heads import fit_head


def _problem(n=120, d=6, v=40, k=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    S = sp.random(n, v, density=0.1, random_state=seed, format="csr", dtype=np.float32)
    z = X @ rng.normal(size=(d, k)) + S @ rng.normal(size=(v, k)) * 2
    P = np.exp(z - z.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    P[0] = [1.0, 0.0, 0.0]  # a zero probability: log p = -inf must stay harmless
    hard = P.argmax(1)
    hard[:10] = (hard[:10] + 1) % k  # some hard labels disagree with the soft ones
    w = rng.uniform(0.5, 2.0, size=n).astype(np.float32)
    return X, S, P.astype(np.float32), hard, w


def _torch_objective(X, S, P, hard, w, W, V, b, *, c, dense_weight, alpha, temperature):
    import torch

    from protege.losses import distillation_loss

    Wt, Vt, bt = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (W, V, b))
    z = bt + torch.tensor(X * dense_weight, dtype=torch.float64) @ Wt + torch.tensor(S.toarray(), dtype=torch.float64) @ Vt
    loss = distillation_loss(z, torch.tensor(P, dtype=torch.float64), torch.tensor(hard), alpha=alpha,
                             temperature=temperature, sample_weight=torch.tensor(w, dtype=torch.float64))
    loss = loss + 1.0 / (2.0 * c * len(P)) * ((Wt * Wt).sum() + (Vt * Vt).sum())
    loss.backward()
    return float(loss.detach()), Wt.grad.numpy(), Vt.grad.numpy(), bt.grad.numpy()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_fitted_head_is_the_optimum_of_distillation_loss(alpha):
    """At the returned head, autograd's gradient of the reference objective (distillation_loss + L2) is ~0."""
    X, S, P, hard, w = _problem()
    head = fit_head(X, S, P, hard, c=3.0, dense_weight=0.5, sample_weight=w, alpha=alpha, temperature=2.0,
                    max_iter=500)
    W = head.W / 0.5  # stored W carries the dense weight
    loss, gW, gV, gb = _torch_objective(X, S, P, hard, w, W, head.V, head.b, c=3.0, dense_weight=0.5, alpha=alpha,
                                        temperature=2.0)
    assert np.isfinite(loss)
    assert max(np.abs(gW).max(), np.abs(gV).max(), np.abs(gb).max()) < 1e-3
    # and it is a real fit: it beats the all-zero head on the same objective
    zero = _torch_objective(X, S, P, hard, w, np.zeros_like(W), np.zeros_like(head.V), np.zeros_like(head.b),
                            c=3.0, dense_weight=0.5, alpha=alpha, temperature=2.0)[0]
    assert loss < zero - 0.05


def test_warm_start_reaches_the_same_head_and_balanced_weights_change_it():
    X, S, P, hard, _ = _problem(seed=1)
    cold = fit_head(X, S, P, hard, c=10.0, max_iter=500)
    warm = fit_head(X, S, P, hard, c=10.0, max_iter=500, init=fit_head(X, S, P, hard, c=1.0, max_iter=500))
    assert np.abs(cold.logits(X, S) - warm.logits(X, S)).max() < 1e-2
    bal = fit_head(X, S, P, hard, c=10.0, balanced=True, max_iter=500)
    assert np.abs(bal.logits(X, S) - cold.logits(X, S)).max() > 1e-2


def test_dense_only_and_sparse_only_heads():
    X, S, P, hard, _ = _problem(seed=2)
    assert fit_head(X, None, P, hard).V.shape == (0, 3)
    h = fit_head(None, S, P, hard)
    assert h.W.shape == (0, 3) and (h.logits(None, S).argmax(1) == hard).mean() > 0.5


def test_successive_halving_scores_every_setting_on_two_folds_and_only_the_best_on_the_rest():
    from protege.students.ladder import stratified_folds
    from protege.students.rungs import HALVING_AFTER, HALVING_KEEP, Data, _cv_grid, best_setting

    X, S, P, hard, _ = _problem(n=150, seed=3)
    d = Data(texts=[str(i) for i in range(150)], P=P, hard=hard, weight=np.ones(150, np.float32), labels=["a", "b", "c"])
    grid = [{"c": c, "balanced": b} for b in (False, True) for c in (0.01, 0.1, 1.0, 10.0)]
    folds = stratified_folds(hard, 5)
    z = _cv_grid(d, folds, grid, 1.0, X, lambda tr, ans: {"word": S}, lambda p, blocks: blocks["word"])
    scored = np.isfinite(z[:, :, 0])
    first = np.concatenate([te for _, te in folds[:HALVING_AFTER]])
    assert scored[:, first].all()  # every setting on the first folds
    full = scored.all(1)
    assert full.sum() == HALVING_KEEP  # only the best go on
    scores, g = best_setting(z, hard)
    assert full[g] and scores[g] == max(s for s, f in zip(scores, full) if f)
    # a pruned setting never wins, even when its partial score is the highest
    z2 = z.copy()
    loser = int(np.flatnonzero(~full)[0])
    z2[loser][scored[loser]] = np.eye(3)[hard[scored[loser]]] * 10
    assert best_setting(z2, hard)[1] != loser

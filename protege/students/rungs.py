"""The rungs of the student ladder (:mod:`protege.students.ladder`): each one a way to build a real student, with
a small grid of settings that cross-validation chooses from.

A rung computes what does not depend on the fold once (``prepare``: the static embedding mean, the frozen
encoder's embeddings of every text), then per fold only what does (the n-gram vocabulary) and refits only the
convex head (:func:`protege.students.heads.fit_head`) per setting — so a grid of 8 settings costs 8 head fits
per fold, not 8 featurisations.

``cv(folds, grid, frac)`` returns out-of-fold logits ``[len(grid), n, k]`` (rows of a fold's held-out part
filled by a model fitted on its training part, subsampled to ``frac``); ``refit(params)`` returns the student
fitted on every row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from protege.students.heads import fit_head
from protege.students.ngrams import ngram_features


@dataclass
class Data:
    """The teacher-labelled rows the ladder trains on (gold never reaches here) and the unlabelled pool."""

    texts: list[str]
    P: np.ndarray                 # teacher probabilities [n, k]
    hard: np.ndarray              # teacher labels [n]
    weight: np.ndarray            # per-row loss weight (real rows: curate.real_weight)
    labels: list[str]
    pool: list[str] = field(default_factory=list)  # unlabelled inputs (data.inputs, no limit), for static-distilled
    alpha: float = 0.5
    temperature: float = 2.0
    max_iter: int = 200
    seed: int = 0


def _sub(tr: np.ndarray, frac: float, seed: int) -> np.ndarray:
    if frac >= 1.0:
        return tr
    k = max(2, int(round(len(tr) * frac)))
    return np.sort(np.random.default_rng(seed).permutation(tr)[:k])


def _fit(d: Data, X, S, idx, p: dict, P=None, hard=None, weight=None, init=None):
    return fit_head(None if X is None else X[idx], None if S is None else S[idx],
                    (d.P if P is None else P)[idx], (d.hard if hard is None else hard)[idx],
                    c=p["c"], dense_weight=p.get("dense_weight", 1.0), balanced=p["balanced"],
                    sample_weight=(d.weight if weight is None else weight)[idx], alpha=d.alpha,
                    temperature=d.temperature, max_iter=d.max_iter, seed=d.seed, init=init)


def _path_key(p: dict) -> tuple:
    """Settings that differ only in C share a regularisation path: each fit warm-starts from the previous C's head."""
    return tuple(sorted((k, v) for k, v in p.items() if k != "c"))


HALVING_AFTER = 2  # folds on which every setting of a grid is scored ...
HALVING_KEEP = 4   # ... before only this many best go on to the remaining folds (successive halving)


def _cv_grid(d: Data, folds, grid, frac: float, X, S_fold, S_of) -> np.ndarray:
    """Out-of-fold logits ``[len(grid), n, k]`` of a head per setting. ``S_fold(tr, analyzers)``: the fold's sparse
    blocks by analyzer; ``S_of(p, blocks)``: the block setting ``p`` uses.

    Successive halving: after :data:`HALVING_AFTER` folds only the :data:`HALVING_KEEP` settings with the best
    agreement so far are fitted on the remaining folds (the others stay NaN there, and :func:`best_setting` only
    picks among fully scored ones) — a grid of 16 costs 16·2 + 4·3 fits over 5 folds instead of 80. Along each C
    path (grids list C ascending) a fit warm-starts from the previous head (same optimum, fewer L-BFGS steps)."""
    out = np.full((len(grid), len(d.texts), len(d.labels)), np.nan, dtype=np.float32)
    alive = list(range(len(grid)))
    for f, (tr, te) in enumerate(folds):
        if f == HALVING_AFTER and len(alive) > HALVING_KEEP:
            ok = np.isfinite(out[:, :, 0])
            acc = [float(np.mean(out[g][ok[g]].argmax(1) == d.hard[ok[g]])) for g in alive]
            alive = [alive[i] for i in sorted(np.argsort(acc, kind="stable")[::-1][:HALVING_KEEP])]
        tr = _sub(tr, frac, d.seed + f)
        blocks = S_fold(tr, {grid[g].get("analyzer", "word") for g in alive})
        prev: dict[tuple, object] = {}
        for g in alive:
            p = grid[g]
            S = S_of(p, blocks)
            key = _path_key(p)
            prev[key] = head = _fit(d, X, S, tr, p, init=prev.get(key))
            out[g, te] = head.logits(X[te] if X is not None else None, None if S is None else S[te])
    return out


def best_setting(logits: np.ndarray, hard: np.ndarray) -> tuple[list[float], int]:
    """(agreement per setting over its scored rows, index of the best among the most fully scored settings; ties
    to the earlier, simpler grid entry)."""
    seen = np.isfinite(logits).all(2)
    scores = [float(np.mean(z[s].argmax(1) == hard[s])) if s.any() else float("nan") for z, s in zip(logits, seen)]
    cover = seen.sum(1)
    full = [i for i in range(len(scores)) if cover[i] == cover.max()]
    return scores, max(full, key=lambda i: (scores[i], -i))


class StaticRung:
    """The static student (static embedding mean + TF-IDF n-grams): C, dense weight, class balance and the n-gram
    analyzer (``analyzers``: word, and char where :func:`~protege.students.ngrams.analyzer_options` says) by CV."""

    name = "static"

    def __init__(self, d: Data, embedder: str, dims: int, ngrams: int, min_df: int, c: float, dense_weight: float,
                 analyzers: Sequence[str] = ("word",)):
        self.d, self.embedder, self.dims, self.n, self.min_df = d, embedder, dims, ngrams, min_df
        cs = sorted({round(c / 3, 3), round(c * 3, 3)})
        dws = sorted({dense_weight, 1.0})
        ans = list(analyzers) if ngrams else ["word"]
        self.grid = [{"c": cc, "dense_weight": dw, "balanced": bal, **({"analyzer": a} if a != "word" else {})}
                     for a in ans for bal in (False, True) for dw in dws for cc in cs]

    def _student(self, analyzer: str = "word"):
        from protege.students.classifier import StaticClassifier

        return StaticClassifier.from_encoder(self.embedder, self.d.labels, self.dims, ngrams=self.n,
                                             ngram_min_df=self.min_df, ngram_analyzer=analyzer)

    def prepare(self) -> None:
        self.base = self._student()
        self.base.fit_idf(self.d.texts)  # unsupervised, all labelled texts (as the static train path does)
        self.X = self.base.encode(self.d.texts)

    def _S(self, fit_texts: Sequence[str], texts: Sequence[str], analyzer: str = "word"):
        if not self.n:
            return None, None
        ng = ngram_features(self.n, self.min_df, analyzer).fit(list(fit_texts))
        return ng, ng.transform(list(texts))

    def cv(self, folds, grid, frac: float = 1.0) -> np.ndarray:
        d = self.d
        return _cv_grid(d, folds, grid, frac, self.X,
                        lambda tr, ans: {a: self._S([d.texts[i] for i in tr], d.texts, a)[1] for a in ans},
                        lambda p, blocks: blocks[p.get("analyzer", "word")])

    def refit(self, p: dict):
        d = self.d
        st = self._student(p.get("analyzer", "word"))
        st.fit_idf(d.texts)
        ng, S = self._S(d.texts, d.texts, p.get("analyzer", "word"))
        return _assemble(st, ng, _fit(d, st.encode(d.texts), S, np.arange(len(d.texts)), p))


def _assemble(st, ng, head):
    """A :class:`StaticClassifier` with its n-gram block and a head fitted outside it."""
    st.ngrams = ng
    st.W, st.b = head.W, head.b
    st.V = head.V if ng is not None else np.zeros((0, len(head.b)), dtype=np.float32)
    return st


# Frozen-encoder embeddings by (int8 export folder, max_length), then text: a text is embedded once per process however many
# ladders run in it (re-training after a curate change, a benchmark's label budgets). Bounded: cleared past the cap.
_EMBEDDINGS: dict[tuple, dict[str, np.ndarray]] = {}
MAX_CACHED_EMBEDDINGS = 100_000


class FrozenRung:
    """Frozen sentence-encoder embedding (ONNX int8), with or without TF-IDF n-grams, one linear head."""

    name = "frozen"

    def __init__(self, d: Data, encoder: str, min_df: int = 2, max_length: int = 128, threads: int = 1,
                 analyzers: Sequence[str] = ("word",)):
        self.d, self.encoder, self.min_df, self.max_length, self.threads = d, encoder, min_df, max_length, threads
        ngs = [(0, "word")] + [(2, a) for a in analyzers]
        self.grid = [{"c": c, "ngrams": n, "balanced": bal, **({"analyzer": a} if a != "word" else {})}
                     for bal in (False, True) for n, a in ngs for c in (0.3, 1.0, 10.0)]

    def prepare(self) -> None:
        from protege.students.frozen import FrozenClassifier

        self.proto = FrozenClassifier.from_encoder(self.encoder, self.d.labels, max_length=self.max_length,
                                                   threads=self.threads)
        # keyed by the int8 export's folder: its name fingerprints the weights, so another model never hits
        self._cache = _EMBEDDINGS.setdefault((str(self.proto.encoder.folder), self.max_length), {})
        self.X = self.embed(self.d.texts)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if len(self._cache) + len(todo) > MAX_CACHED_EMBEDDINGS:
            self._cache.clear()
            todo = list(dict.fromkeys(texts))
        if todo:
            for t, e in zip(todo, self.proto.encoder.encode(todo)):
                self._cache[t] = e
        return np.stack([self._cache[t] for t in texts]) if len(texts) else np.zeros((0, 1), np.float32)

    def cv(self, folds, grid, frac: float = 1.0) -> np.ndarray:
        d = self.d
        ng_an = {p.get("analyzer", "word") for p in grid if p["ngrams"]}
        return _cv_grid(d, folds, grid, frac, self.X,
                        lambda tr, ans: {a: ngram_features(2, self.min_df, a).fit([d.texts[i] for i in tr]).transform(
                            d.texts) for a in ans & ng_an},
                        lambda p, blocks: blocks[p.get("analyzer", "word")] if p["ngrams"] else None)

    def refit(self, p: dict):
        from protege.students.frozen import FrozenClassifier

        d = self.d
        ng = ngram_features(p["ngrams"], self.min_df, p.get("analyzer", "word")) if p["ngrams"] else None
        m = FrozenClassifier(self.proto.encoder, d.labels, ng, source=self.encoder)
        return m.fit(d.texts, d.P, hard_labels=d.hard, sample_weight=d.weight, X=self.X, c=p["c"],
                     balanced=p["balanced"], alpha=d.alpha, temperature=d.temperature, max_iter=d.max_iter, seed=d.seed)


class DistilledRung:
    """A static student re-distilled from an encoder-based rung: the labeller (fitted on the fold's teacher labels)
    labels the unlabelled pool (soft), and the static student trains on those pseudo-labels plus the teacher's.

    Held-out fold texts are never pseudo-labelled for that fold. IDF and the n-gram vocabulary are fitted once on
    the labelled rows plus the pool (unsupervised: no label of a held-out row is seen)."""

    name = "static-distilled"

    def __init__(self, d: Data, static: StaticRung, labeller: FrozenRung):
        self.d, self.static, self.lab = d, static, labeller
        self.sp = self.lp = None
        self.grid = [{"pseudo_weight": w} for w in (0.5, 1.0)]

    def bind(self, by_name: dict, chosen: dict) -> None:
        """Take the static and labeller rungs' CV-chosen settings (they run earlier in the ladder)."""
        if self.lab.name not in chosen or self.static.name not in chosen:
            raise ValueError(f"static-distilled needs the {self.static.name} and {self.lab.name} rungs trained first")
        self.sp, self.lp = chosen[self.static.name], chosen[self.lab.name]
        if not self.d.pool:
            raise ValueError("no unlabelled pool to re-distil on (data.inputs)")

    def prepare(self) -> None:
        d = self.d
        key = set(d.texts)
        self.extra = [t for t in dict.fromkeys(d.pool) if t not in key]  # pool texts the teacher did not label
        self.all_texts = d.texts + self.extra
        sa = self.sp.get("analyzer", "word")
        self.st = self.static._student(sa)
        self.st.fit_idf(self.all_texts)
        self.Xs = self.st.encode(self.all_texts)
        self.ng = ngram_features(self.static.n, self.static.min_df, sa).fit(self.all_texts) if self.static.n else None
        self.S = self.ng.transform(self.all_texts) if self.ng is not None else None
        self.Xe = self.lab.embed(self.all_texts)
        self.Se = ngram_features(2, self.lab.min_df, self.lp.get("analyzer", "word")).fit(self.all_texts).transform(
            self.all_texts) if self.lp["ngrams"] else None

    def _pseudo(self, tr: np.ndarray):
        """The labeller fitted on teacher rows ``tr``; its soft labels for every pool row the teacher did not label."""
        d, n = self.d, len(self.d.texts)
        labeller = _fit(d, self.Xe, self.Se, tr, self.lp)
        keep = np.arange(n, len(self.all_texts))
        return keep, _softmax(labeller.logits(self.Xe[keep], None if self.Se is None else self.Se[keep]))

    def _train(self, tr: np.ndarray, pseudo, p: dict, init=None):
        """Head fitted on teacher rows ``tr`` + the pseudo-labelled pool rows ``pseudo`` = (rows, soft labels)."""
        d = self.d
        keep, Pp = pseudo
        idx = np.concatenate([tr, keep])
        P = np.concatenate([d.P[tr], Pp]).astype(np.float32)
        hard = np.concatenate([d.hard[tr], Pp.argmax(1)])
        w = np.concatenate([d.weight[tr], np.full(len(keep), p["pseudo_weight"], np.float32)])
        head = fit_head(self.Xs[idx], None if self.S is None else self.S[idx], P, hard, c=self.sp["c"],
                        dense_weight=self.sp["dense_weight"], balanced=self.sp["balanced"], sample_weight=w,
                        alpha=d.alpha, temperature=d.temperature, max_iter=d.max_iter, seed=d.seed, init=init)
        return head, len(keep)

    def cv(self, folds, grid, frac: float = 1.0) -> np.ndarray:
        """Out of fold on the first :data:`DISTILLED_FOLDS` folds only (the rest NaN: unscored, as the encoder's):
        every fit here trains on the whole pool, so each fold costs pool-sized fits; the ladder compares rungs on
        the rows both scored. One labeller per fold; the pseudo-weight grid warm-starts along itself."""
        d = self.d
        out = np.full((len(grid), len(d.texts), len(d.labels)), np.nan, dtype=np.float32)
        for f, (tr, te) in enumerate(folds[:DISTILLED_FOLDS]):
            tr = _sub(tr, frac, d.seed + f)
            pseudo, head = self._pseudo(tr), None
            for g, p in enumerate(grid):
                head, self.n_pseudo = self._train(tr, pseudo, p, init=head)
                out[g, te] = head.logits(self.Xs[te], None if self.S is None else self.S[te])
        return out

    def refit(self, p: dict):
        tr = np.arange(len(self.d.texts))
        head, self.n_pseudo = self._train(tr, self._pseudo(tr), p)
        st = self.static._student(self.sp.get("analyzer", "word"))
        st.fit_idf(self.all_texts)
        return _assemble(st, self.ng, head)


DISTILLED_FOLDS = 3


class EncoderRung:
    """The fine-tuned encoder with KD (:mod:`protege.students.encoder`), served through its int8 ONNX export.
    Minutes per fit on CPU, so it is scored on the first fold only (``cv`` leaves the other folds' rows unscored:
    NaN logits; the ladder compares rungs on the rows both scored), runs last in the ladder, and only when its
    own estimate (:meth:`estimate_s`: real training steps timed on this machine) fits the ladder's time budget."""

    name = "encoder"
    min_rows = 200  # below this a fold-0 score is too noisy to choose a 22M-parameter model on, and frozen wins

    def __init__(self, d: Data, task):
        self.d, self.task, self.grid = d, task, [{"balanced": False}]

    def skip_reason(self) -> str | None:
        if len(self.d.texts) < self.min_rows:
            return f"{len(self.d.texts)} teacher-labelled rows, fewer than the {self.min_rows} it needs"
        return None

    def prepare(self) -> None:
        pass

    def _model(self, inference: str = "onnx-int8"):
        from protege.students.encoder import EncoderClassifier

        s, t = self.task.student, self.task.train
        return EncoderClassifier.from_base(s.model or s.embedder, self.d.labels, max_length=min(s.max_length, 128),
                                           seed=t.seed, inference=inference)

    def estimate_s(self, folds) -> float:
        """Seconds for the fold-0 fit plus the refit on every row (a few real steps timed on 256 of the rows, then
        extrapolated; within a few % of the real fit here) and the refit's int8 export (~20 s for MiniLM)."""
        d, s = self.d, self.task.student
        tr = folds[0][0]
        if getattr(self, "_per_row", None) is None:  # timed once: the ladder asks before it starts and again later
            sample = [d.texts[i] for i in np.random.default_rng(d.seed).permutation(len(d.texts))[:256]]
            self._per_row = self._model("torch").estimate_fit_seconds(sample, epochs=s.epochs, n_rows=1,
                                                                      batch_size=s.batch_size)
        return float(self._per_row * (len(tr) + len(d.texts)) + 25.0)

    def _fit(self, idx, p, inference: str = "onnx-int8"):
        d, s, t = self.d, self.task.student, self.task.train
        m = self._model(inference)
        counts = np.bincount(d.hard[idx], minlength=len(d.labels)).astype(np.float32)
        cw = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(d.labels), 0.0) if p["balanced"] else None
        return m.fit([d.texts[i] for i in idx], d.P[idx], hard_labels=d.hard[idx], sample_weight=d.weight[idx],
                     alpha=d.alpha, temperature=d.temperature, epochs=s.epochs, lr=s.lr or 5e-5,
                     batch_size=s.batch_size, seed=t.seed, class_weights=cw)

    def cv(self, folds, grid, frac: float = 1.0) -> np.ndarray:
        d = self.d
        out = np.full((len(grid), len(d.texts), len(d.labels)), np.nan, dtype=np.float32)
        tr, te = folds[0]
        tr = _sub(tr, frac, d.seed)
        for g, p in enumerate(grid):  # torch for the fold model: no export (int8 agrees with it on ~98% of items)
            out[g, te] = self._fit(tr, p, "torch").decision_function([d.texts[i] for i in te])
        return out

    def refit(self, p: dict):
        return self._fit(np.arange(len(self.d.texts)), p)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)

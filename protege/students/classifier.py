"""The fast classifier student: static token embeddings + sparse word n-grams, one linear head.

Two views of a text feed one linear layer (logits = embedding · W + n-grams · V + b):

- the IDF-weighted mean of static token embeddings (distilled from a sentence encoder,
  :mod:`protege.students.static`): meaning for words the training set never showed, and most of the
  signal when inputs are short;
- sublinear TF-IDF word 1..n-grams (:mod:`protege.students.ngrams`): a sparse logit table, one weight per
  (n-gram, label) — what decides a long document's topic, and what a mean of embeddings blurs away; or
  character n-grams (:mod:`protege.students.chargrams`) for text without word breaks (Chinese headlines).

The head is fitted as one convex problem — the KD loss (:func:`protege.losses.distillation_loss`: the
teacher's tempered soft labels mixed with its hard labels by ``alpha``) plus an L2 penalty ``1/(2·C·n)``
(scikit-learn's ``C``) — by full-batch L-BFGS: no learning rate, no epochs to tune, the same answer on
every run. The embedding block is scaled by ``dense_weight`` before the fit; a smaller weight means a
stronger penalty on it. Measured on bbc-topics (long articles, 781 teacher labels, 426 gold): n-grams
alone 0.939, + embeddings at 0.3 → 0.941, at 1.0 → 0.918 (the embeddings then fit the teacher's
systematic errors: cross-validated agreement *with the teacher* rises while gold accuracy falls); on the
same articles' titles only (short inputs) 0.68 → 0.76 going from n-grams alone to weight 1.0. Hence the
default 0.3 and the advice to raise it for short inputs. Inference is numpy / scipy only.

IDF weights for the embedding mean are fitted on the training texts at ``fit`` time: a mean of static
embeddings is dominated by frequent tokens ("the", ",") unless they are down-weighted; this is the SIF /
Zipf weighting of model2vec with the task's own frequencies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from protege import __version__
from protege.students.ngrams import NgramFeatures, ngram_features
from protege.students import static_kernels as _kernels
from protege.students.words import (
    _NGRAM_TOKEN,
    WordCache,
    WordTable,
    clean_text,
    indptr_of,
    tokenizes_per_word,
)

__all__ = ["LogitClassifier", "StaticClassifier", "WordCache", "WordTable", "clean_text"]
_tokenizes_per_word = tokenizes_per_word  # the name the ONNX runner and older code import


class LogitClassifier:
    """``predict_proba`` / ``predict`` for any classifier that has ``labels`` and ``decision_function``."""

    labels: list[str]

    def decision_function(self, texts: Sequence[str]) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        z = self.decision_function(texts)
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)

    def predict(self, texts: Sequence[str]) -> list[str]:
        return [self.labels[i] for i in self.decision_function(texts).argmax(1)]


class StaticClassifier(LogitClassifier):
    """sklearn-style ``fit / predict / predict_proba`` plus HF-style ``save_pretrained / from_pretrained``."""

    use_compiled: bool | None = None  # None: the compiled path wherever it applies; False: always numpy

    def __init__(self, embeddings: np.ndarray, tokenizer, labels: list[str], max_tokens: int = 2048,
                 ngrams: NgramFeatures | None = None, word_cache_bytes: int = 16 << 20):
        self.base = embeddings.astype(np.float32)
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.labels = list(labels)
        self.max_tokens = max_tokens
        self.idf = np.ones(len(self.base), dtype=np.float32)
        self.table = self.base
        self.ngrams = ngrams
        self.W = np.zeros((self.base.shape[1], len(labels)), dtype=np.float32)
        self.V = np.zeros((len(ngrams) if ngrams else 0, len(labels)), dtype=np.float32)
        self.b = np.zeros(len(labels), dtype=np.float32)
        self.history: list[dict] = []
        self._word_cache = WordTable(self.tokenizer, word_cache_bytes)
        self._per_word = tokenizes_per_word(self.tokenizer)

    @classmethod
    def from_encoder(cls, encoder: str, labels: list[str], dims: int = 256, *, ngrams: int = 2,
                     ngram_min_df: int = 2, ngram_analyzer: str = "word") -> "StaticClassifier":
        from tokenizers import Tokenizer

        from protege.students.static import distill_static

        emb, tok_path = distill_static(encoder, dims)
        feats = ngram_features(ngrams, ngram_min_df, ngram_analyzer) if ngrams else None
        return cls(emb, Tokenizer.from_file(str(tok_path)), labels, ngrams=feats)

    # -- features ------------------------------------------------------------------------------
    def _token_ids(self, texts: Sequence[str], cells: bool = False, rows: bool = True
                   ) -> tuple[np.ndarray, np.ndarray, object]:
        """``(ids, indptr, ngram rows)``: each text's first ``max_tokens`` token ids (flat; text ``i`` is
        ``ids[indptr[i]:indptr[i + 1]]``) and, with an n-gram block, its TF-IDF rows (a CSR matrix, or with
        ``cells`` and one text the ``(row, column, weight)`` arrays of :meth:`NgramFeatures.cells`), else None.

        WordPiece tokenizers split on whitespace first and then tokenize each chunk on its own, so the ids
        come from a word table (:class:`~protege.students.words.WordTable`: one C-level dict lookup per
        word, numpy gathers, each new word tokenized once), which also holds each word's n-gram words — the
        n-gram regex never runs on a text it has seen the words of. Tokenizers for which per-word does not
        hold (checked once, at construction) are run whole. The table is bounded: traffic of ever-new words
        cannot grow the process. Lone surrogates are replaced first (:func:`clean_text`).
        """
        texts = [clean_text(t) for t in texts]
        ng = self.ngrams if self.ngrams is not None and len(self.ngrams) else None
        if ng is not None and ng.analyzer != "word":  # character n-grams: read from the texts, a batch at a time
            ids, ptr, _ = StaticClassifier._token_ids_words(self, texts, None, cells)  # self: maybe the ONNX runner
            if not rows:  # the caller wants the token ids only (encode, fit_idf)
                return ids, ptr, None
            if cells and len(texts) == 1:
                return ids, ptr, ng.char_cells(texts)
            return ids, ptr, ng.transform(texts)
        return StaticClassifier._token_ids_words(self, texts, ng, cells)

    def _token_ids_words(self, texts: list[str], ng, cells: bool):
        if not self._per_word:  # e.g. byte-level BPE: a word's ids depend on the space before it
            enc = [e.ids[: self.max_tokens] for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
            ids = np.fromiter((i for x in enc for i in x), dtype=np.int64, count=sum(map(len, enc)))
            ptr = indptr_of(list(map(len, enc)))
            if ng is None:
                return ids, ptr, None
            toks = [_NGRAM_TOKEN.findall(t.lower()) for t in texts]
            ng_ids, ng_ptr = ng.word_ids([w for x in toks for w in x]), indptr_of(list(map(len, toks)))
            if cells and len(texts) == 1:
                return ids, ptr, ng.cells(ng_ids, ng_ptr)
            return ids, ptr, ng.from_word_ids(ng_ids, ng_ptr)
        table = self._word_cache
        if not isinstance(table, WordTable):  # an object borrowing this method with a dict (older ONNX runner)
            table = self._word_cache = WordTable(self.tokenizer)
        ids, ptr, ng_ids, ng_ptr = table.encode(texts, self.max_tokens, ng._index()[0] if ng is not None else None)
        if ng is None:
            return ids, ptr, None
        if cells and len(texts) == 1:
            return ids, ptr, ng.cells(ng_ids, ng_ptr)
        return ids, ptr, ng.from_word_ids(ng_ids, ng_ptr, separated=True)

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's first ``max_tokens`` token ids, as lists (what the tokenizer alone gives)."""
        ids, ptr, _ = self._token_ids(texts)
        return [ids[ptr[i] : ptr[i + 1]].tolist() for i in range(len(ptr) - 1)]

    def _embed(self, ids: np.ndarray, ptr: np.ndarray) -> np.ndarray:
        """L2-normalised IDF-weighted mean of the texts' token embeddings: one sparse (texts × vocab) count
        matrix times the IDF-scaled table (the mean's division by the IDF sum cancels in the norm)."""
        n = len(ptr) - 1
        if n == 1:  # one text: skip building a sparse matrix
            u, c = np.unique(ids, return_counts=True)
            X = (c.astype(np.float32) @ self.table[u])[None, :]
        else:
            S = sp.csr_matrix((np.ones(len(ids), dtype=np.float32), ids, ptr), shape=(n, len(self.table)))
            X = np.asarray(S @ self.table, dtype=np.float32)
        return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-9)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised IDF-weighted mean of static token embeddings, [n, dims]."""
        ids, ptr, _ = self._token_ids(list(texts), rows=False)
        return self._embed(ids, ptr)

    def fit_idf(self, texts: Sequence[str]) -> None:
        ids, ptr, _ = self._token_ids(list(texts), rows=False)
        doc = np.repeat(np.arange(len(ptr) - 1, dtype=np.int64), np.diff(ptr))
        cells = np.unique(doc * len(self.base) + ids)
        df = np.bincount(cells % len(self.base), minlength=len(self.base)).astype(np.float64)
        self.idf = (np.log((1 + len(texts)) / (1 + df)) + 1).astype(np.float32)
        self.table = self.base * self.idf[:, None]

    # -- training ------------------------------------------------------------------------------
    def fit(self, texts: Sequence[str], teacher_probs: np.ndarray, *, hard_labels: np.ndarray | None = None,
            sample_weight: np.ndarray | None = None, dev: tuple[Sequence[str], np.ndarray] | None = None,
            alpha: float = 0.5, temperature: float = 2.0, c: float = 10.0, dense_weight: float = 0.3,
            max_iter: int = 200, class_weights: np.ndarray | None = None,
            idf_texts: Sequence[str] | None = None, seed: int = 0) -> "StaticClassifier":
        """Fit IDF, the n-gram vocabulary and the head (convex: KD loss + L2, full-batch L-BFGS).

        ``dev`` (texts, teacher probs) is only scored — agreement and loss land in ``history`` — because
        the problem is convex there is nothing to early-stop; pick ``c`` / ``dense_weight`` on it if you
        must, but know that agreement with a noisy teacher is not accuracy (see the module docstring).
        """
        import torch

        from protege.losses import distillation_loss

        torch.manual_seed(seed)
        texts = list(texts)
        self.fit_idf(list(idf_texts) if idf_texts is not None else texts)
        if self.ngrams is not None:
            self.ngrams.fit(texts)
        X = torch.tensor(self.encode(texts) * dense_weight)
        S = _torch_sparse(self.ngrams.transform(texts)) if self.ngrams is not None else None
        P = torch.tensor(np.asarray(teacher_probs, dtype=np.float32))
        y = torch.tensor(hard_labels if hard_labels is not None else P.argmax(1).numpy(), dtype=torch.long)
        w = torch.tensor(sample_weight, dtype=torch.float32) if sample_weight is not None else None
        cw = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        k = len(self.labels)
        W = torch.zeros(X.shape[1], k, requires_grad=True)
        V = torch.zeros(len(self.ngrams) if self.ngrams is not None else 0, k, requires_grad=True)
        b = torch.zeros(k, requires_grad=True)
        lam = 1.0 / (2.0 * c * max(len(texts), 1))
        opt = torch.optim.LBFGS([W, V, b], max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                                line_search_fn="strong_wolfe")

        def logits_of(Xd, Sd):
            z = Xd @ W + b
            return z if Sd is None else z + Sd @ V

        def closure():
            opt.zero_grad()
            loss = distillation_loss(logits_of(X, S), P, y, alpha=alpha, temperature=temperature,
                                     class_weights=cw, sample_weight=w)
            total = loss + lam * ((W * W).sum() + (V * V).sum())
            total.backward()
            self.history.append({"step": len(self.history), "loss": float(loss.detach()),
                                 "objective": float(total.detach())})
            return total

        opt.step(closure)
        self.W = np.ascontiguousarray(W.detach().numpy() * dense_weight, dtype=np.float32)
        self.V = np.ascontiguousarray(V.detach().numpy(), dtype=np.float32)
        self.b = b.detach().numpy().astype(np.float32)
        if dev is not None and len(dev[0]):
            Pd = np.asarray(dev[1], dtype=np.float32)
            zd = torch.tensor(self.decision_function(dev[0]))
            self.history.append({"dev_agreement": float(np.mean(zd.argmax(1).numpy() == Pd.argmax(1))),
                                 "dev_loss": float(distillation_loss(zd, torch.tensor(Pd), alpha=alpha,
                                                                     temperature=temperature))})
        return self

    # -- inference -----------------------------------------------------------------------------
    def decision_function(self, texts: Sequence[str]) -> np.ndarray:
        if self._compiled():
            return self._compiled_logits([clean_text(t) for t in texts])
        ids, ptr, ng = self._token_ids(list(texts), cells=True)
        z = self._embed(ids, ptr) @ self.W + self.b
        if isinstance(ng, tuple):  # one text: its n-gram cells' weights times their rows of V
            z[0] += ng[2] @ self.V[ng[1]]
        elif ng is not None:
            z += ng @ self.V
        return z

    def _compiled(self) -> bool:
        """Whether the compiled path (:mod:`protege.students.static_kernels`) serves this student: numba
        imports, the tokenizer splits per word, n-grams (if any) are word 1–2-grams, and ``use_compiled`` is
        not False (the tests and bench/static_speed.py set it to compare the two paths)."""
        ng = self.ngrams
        return (self.use_compiled is not False and _kernels.available() and self._per_word
                and isinstance(self._word_cache, WordTable)
                and (ng is None or not len(ng) or (ng.analyzer == "word" and ng.n <= 2)))

    def _compiled_logits(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        ng = self.ngrams if self.ngrams is not None and len(self.ngrams) else None
        key = (self.W, self.V, self.b, self.table, ng, ng and ng.vocab, ng and ng.idf)
        held = getattr(self, "_kernel_for", None)
        if held is None or any(x is not y for x, y in zip(held, key)):
            WT = np.ascontiguousarray(self.W.T, dtype=np.float32)
            if ng is not None:
                words, index, uni = ng._index()
                args = (uni, index.slots, index.bits, index.window, len(words) + 1, ng.n, ng.idf, self.V)
            else:
                empty = np.zeros((1, 2), dtype=np.int64)
                args = (np.zeros(1, np.int64), empty, 1, 1, 1, 0, np.zeros(0, np.float32), self.V)
            self._kernel_args = (self.table, WT, self.b) + args
            self._kernel_for = key  # the arrays themselves (held, so compared by identity safely)
        a = self._kernel_args
        return self._word_cache.run(
            texts, ng._index()[0] if ng is not None else None,
            lambda row, ptr, meta, wp, ngp: _kernels.logits(row, ptr, meta, wp, ngp, self.max_tokens, *a))

    @property
    def n_params(self) -> int:
        return int(self.table.size + self.W.size + self.V.size + self.b.size)

    def scale_logits(self, temperature: float) -> "StaticClassifier":
        """Divide every logit by ``temperature`` (temperature scaling), folded into the head's weights, so
        numpy, saved and ONNX students all carry it; predictions are unchanged, confidences are not."""
        self.W, self.V, self.b = (np.ascontiguousarray(a / np.float32(temperature)) for a in (self.W, self.V, self.b))
        self.temperature = float(temperature) * getattr(self, "temperature", 1.0)
        return self

    # -- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        tensors = {"embeddings": self.base, "idf": self.idf, "head.weight": self.W, "head.bias": self.b}
        if self.ngrams is not None:
            tensors["ngram.weight"] = self.V
            self.ngrams.save(p / "ngrams.json")
        # safetensors writes the raw buffer: a transposed (non-contiguous) view would be saved scrambled
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(p / "model.safetensors"))
        self.tokenizer.save(str(p / "tokenizer.json"))
        (p / "config.json").write_text(json.dumps({
            "protege_student": "static", "labels": self.labels, "dims": int(self.base.shape[1]),
            "max_tokens": self.max_tokens, "ngrams": self.ngrams.n if self.ngrams is not None else 0,
            "temperature_folded": getattr(self, "temperature", 1.0),  # already in the weights; for the record
            "protege_version": __version__}, indent=2), encoding="utf-8")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "StaticClassifier":
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        p = Path(path)
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} is not a protege student folder (no config.json)")
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
        t = load_file(str(p / "model.safetensors"))
        feats = None
        if "ngram.weight" in t:
            feats = NgramFeatures.load(p / "ngrams.json")
        m = cls(t["embeddings"], Tokenizer.from_file(str(p / "tokenizer.json")), cfg["labels"],
                cfg.get("max_tokens", 512), ngrams=feats)
        m.idf = t["idf"]
        m.table = m.base * m.idf[:, None]
        m.W, m.b = t["head.weight"], t["head.bias"]
        if feats is not None:
            m.V = t["ngram.weight"]
        return m


def _torch_sparse(X):
    """scipy CSR → torch sparse COO (float32): ``S @ V`` with autograd into V, without densifying S."""
    import torch

    X = X.tocoo().astype(np.float32)
    idx = torch.from_numpy(np.vstack([X.row, X.col]).astype(np.int64))
    return torch.sparse_coo_tensor(idx, torch.from_numpy(X.data), size=X.shape, check_invariants=False).coalesce()

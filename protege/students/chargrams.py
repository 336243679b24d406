"""Character n-grams for :class:`~protege.students.ngrams.NgramFeatures` (``analyzer="char_wb"`` or ``"char"``),
the same n-grams as scikit-learn's ``TfidfVectorizer(analyzer=...)``, computed a batch at a time.

Why: word n-grams need word boundaries. In text without spaces (Chinese, Japanese, Thai, identifiers) a
whole headline is one "word" and the word block collapses (thucnews-zh: 0.12 accuracy); character n-grams
are the standard fix there, and they also carry misspelt / elongated words of noisy short text.

How, without Python work per n-gram: a batch's texts are lower-cased and joined into one string, its code
points read as one numpy array (UTF-32), every character mapped to an id in the vocabulary's alphabet
(``searchsorted``; ``-1``: in no kept n-gram), and every k-gram keyed as one integer (its character ids in
base A) and looked up in a hash index once per k over the whole batch. A k-gram is kept only inside one
"piece" — a text (``char``) or a space-padded word (``char_wb``) — checked with a cumulative count of piece
starts. Fitting uses the same keys over the training texts' full alphabet and decodes only the kept ones.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from protege.students.words import IntIndex

ANALYZERS = ("word", "char_wb", "char")
_WHITE = re.compile(r"\s\s+")  # = sklearn's _VectorizerMixin._white_spaces


def _strings(texts: Sequence[str], analyzer: str) -> list[str]:
    """Each text as the string its n-grams are read from: ``char``: whitespace runs → one space; ``char_wb``:
    its words, each padded with one space on either side, concatenated (``" a  bc "``)."""
    low = [_WHITE.sub(" ", t.lower()) for t in texts]
    if analyzer == "char":
        return low
    return [f" {'  '.join(ws)} " if (ws := t.split()) else "" for t in low]


def _codes(strings: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(code points, doc of each position, piece start flag)`` of the batch's strings joined."""
    joined = "".join(strings)
    codes = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)
    lens = np.fromiter(map(len, strings), dtype=np.int64, count=len(strings))
    doc = np.repeat(np.arange(len(strings), dtype=np.int64), lens)
    start = np.zeros(len(codes), dtype=bool)
    starts = np.cumsum(lens) - lens
    start[starts[lens > 0]] = True
    return codes, doc, start


def _pieces(codes: np.ndarray, start: np.ndarray, analyzer: str) -> np.ndarray:
    """Piece id of every position: texts, and for ``char_wb`` also words (a word's padded form ends in a space
    and the next one starts with a space: the second of two spaces starts a piece — words hold no space)."""
    s = start.copy()
    if analyzer == "char_wb" and len(codes) > 1:
        s[1:] |= (codes[1:] == 32) & (codes[:-1] == 32)
    return np.cumsum(s) - 1


def gram_keys(ids: np.ndarray, piece: np.ndarray, start: np.ndarray, base: int, lo: int, hi: int, analyzer: str):
    """Yield ``(positions, keys)`` per n-gram length: the k-grams (``lo <= k <= hi``) inside one piece whose
    characters all have ids ``>= 0``, keyed as ``sum((id + 1) * base**j)``; for ``char_wb``, a padded word shorter
    than ``lo`` is one n-gram of its own length (as scikit-learn counts it)."""
    n = len(ids)
    if not n:
        return
    if analyzer == "char_wb" and lo > 3:
        st = np.flatnonzero(np.r_[True, piece[1:] != piece[:-1]])
        wl = np.diff(np.r_[st, n])
        for k in range(3, lo):
            yield from _keys_at(ids, piece, st[wl == k], k, base)
    for k in range(lo, hi + 1):
        yield from _keys_at(ids, piece, np.arange(max(n - k + 1, 0)), k, base)


def _keys_at(ids, piece, pos, k, base):
    if not len(pos):
        return
    pos = pos[pos + k - 1 < len(ids)]
    ok = piece[pos] == piece[pos + k - 1]
    key = np.zeros(len(pos), dtype=np.int64)
    for j in range(k):
        part = ids[pos + j]
        ok &= part >= 0
        key = key * base + part + 1
    yield pos[ok], key[ok]


def _check_base(base: int, hi: int) -> None:
    if float(base) ** hi >= 2.0 ** 62:
        raise ValueError(f"character n-grams up to {hi} over {base - 1} distinct characters do not fit a 64-bit key; "
                         "use a shorter range")


def fit_vocab(texts: Sequence[str], analyzer: str, lo: int, hi: int) -> tuple[list[str], np.ndarray]:
    """Every character n-gram of ``texts`` and its document frequency, as ``(grams, df)``."""
    codes, doc, start = _codes(_strings(texts, analyzer))
    alpha, ids = np.unique(codes, return_inverse=True)
    base = len(alpha) + 1
    _check_base(base, hi)
    piece = _pieces(codes, start, analyzer)
    pairs = []
    for pos, key in gram_keys(ids.astype(np.int64), piece, start, base, lo, hi, analyzer):
        pairs.append((doc[pos], key))
    if not pairs:
        return [], np.zeros(0, np.int64)
    d = np.concatenate([p[0] for p in pairs])
    uk, inv = np.unique(np.concatenate([p[1] for p in pairs]), return_inverse=True)
    cells = np.unique(d * len(uk) + inv)
    df = np.bincount(cells % len(uk), minlength=len(uk))
    return decode(uk, alpha, base), df


def decode(keys: np.ndarray, alpha: np.ndarray, base: int) -> list[str]:
    """The strings of integer n-gram keys (inverse of the keying in :func:`gram_keys`)."""
    out: list[list[int]] = [[] for _ in range(len(keys))]
    k = keys.copy()
    digits = []
    while (k > 0).any():
        k, r = np.divmod(k, base)
        digits.append(r)
    for i in range(len(keys)):
        out[i] = [int(alpha[d[i] - 1]) for d in reversed(digits) if d[i] > 0]
    return ["".join(map(chr, c)) for c in out]


class CharIndex:
    """The vocabulary's alphabet and its n-grams keyed as integers → columns, built once per vocabulary."""

    def __init__(self, vocab: dict[str, int], hi: int):
        self.alpha = np.array(sorted({ord(c) for g in vocab for c in g}), dtype=np.int64)
        self.base = len(self.alpha) + 1
        _check_base(self.base, max(hi, max(map(len, vocab), default=1)))
        pos = {int(c): i for i, c in enumerate(self.alpha)}
        keys = np.empty(len(vocab), dtype=np.int64)
        cols = np.empty(len(vocab), dtype=np.int64)
        for i, (g, col) in enumerate(vocab.items()):
            k = 0
            for ch in g:
                k = k * self.base + pos[ord(ch)] + 1
            keys[i], cols[i] = k, col
        self.index = IntIndex(keys, cols)

    def ids(self, codes: np.ndarray) -> np.ndarray:
        if not len(self.alpha):
            return np.full(len(codes), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.alpha, codes), len(self.alpha) - 1)
        return np.where(self.alpha[at] == codes, at, -1)


def found(index: CharIndex, texts: Sequence[str], analyzer: str, lo: int, hi: int, n_cols: int) -> np.ndarray:
    """``doc * n_cols + column`` of every kept n-gram occurrence in ``texts`` (with repeats: term counts)."""
    codes, doc, start = _codes(_strings(texts, analyzer))
    ids = index.ids(codes)
    piece = _pieces(codes, start, analyzer)
    out = [np.zeros(0, np.int64)]
    for pos, key in gram_keys(ids, piece, start, index.base, lo, hi, analyzer):
        col = index.index.get(key)
        hit = col >= 0
        out.append(doc[pos[hit]] * n_cols + col[hit])
    return np.concatenate(out)

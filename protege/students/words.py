"""Text → token ids for the static student, a batch at a time with no Python work per token.

A text is split on whitespace (``str.split``); each whitespace-separated chunk ("word") is looked up in a
:class:`WordTable`: one dict lookup per word, done in C (``map(dict.get, words)``), gives the word's row;
the rows hold the word's WordPiece ids and the n-gram block's word ids in two flat numpy pools, so a
batch's ids are gathered with a handful of numpy calls. Words the table has not seen are tokenized once
(the tokenizer for the WordPiece ids, the n-gram regex for the n-gram words) and added.

Why per word gives the whole text's ids: WordPiece splits on whitespace before anything else (checked per
tokenizer: :func:`tokenizes_per_word`); the n-gram regex (``\\b\\w\\w+\\b`` on lower-cased text) never matches
across whitespace, and lower-casing is per character except for the final-sigma rule, whose context never
crosses whitespace. So the n-gram words of a text are those of its chunks in order.

The table is bounded like the old :class:`WordCache` (same size estimate per entry): past ``max_bytes`` the
least recently used words go first (a word's recency: the call, then its last position in the call's
words), down to 3/4 of the bound, and the pools are compacted — at the end of a call, so one call's new
words may pass the bound for that call. Words longer than ``max_word`` characters are tokenized for the
call and not kept (a cache of them is what an adversary fills).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from itertools import repeat

import numpy as np

_PROBE = "Hello, world! The cat's naïve résumé costs $3.50 — don't re-run it: e-mail@example.com 東京 x2"
_SEPARATOR = "\ud800"  # a lone surrogate: clean_text has replaced any in a text, so no text has this word
_SEPARATED = f" {_SEPARATOR} "
_NGRAM_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # = protege.students.ngrams._TOKEN (scikit-learn's default)


def clean_text(text: str) -> str:
    """``text`` with lone UTF-16 surrogates (``"\\ud800"`` in JSON: not a character, and no tokenizer takes
    them) replaced by U+FFFD; a pair of surrogates becomes the one character it encodes."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")  # fails only on a surrogate; much faster than searching for one
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def tokenizes_per_word(tokenizer) -> bool:
    """Whether tokenizing whitespace-separated words one by one gives the whole text's ids (WordPiece,
    whitespace WordLevel: yes; byte-level BPE, which folds the leading space into the token: no)."""
    whole = tokenizer.encode(_PROBE, add_special_tokens=False).ids
    return whole == [i for w in _PROBE.split() for i in tokenizer.encode(w, add_special_tokens=False).ids]


def ragged_gather(pool: np.ndarray, start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """``concatenate([pool[s : s + n] for s, n in zip(start, length)])`` without the loop."""
    total = int(length.sum())
    if not total:
        return np.zeros(0, dtype=pool.dtype)
    before = np.cumsum(length) - length
    return pool[np.arange(total) + np.repeat(start - before, length)]


def indptr_of(counts) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


class WordCache:
    """word → token ids, least recently used out first once the entries' estimated size passes ``max_bytes``.

    Kept for code that imports it; the student itself now uses :class:`WordTable`. The size of an entry is
    estimated as ``ENTRY + len(word) + 40 × len(ids)`` bytes. Words longer than ``max_word`` are not cached.
    """

    ENTRY = 150

    def __init__(self, max_bytes: int = 16 << 20, max_word: int = 48):
        self.max_bytes, self.max_word = int(max_bytes), max_word
        self.bytes = 0
        self._d: OrderedDict[str, list[int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, word: str) -> bool:
        return word in self._d

    def ids(self, word: str, encode) -> list[int]:
        d = self._d
        x = d.get(word)
        if x is not None:
            try:
                d.move_to_end(word)
            except KeyError:  # evicted by another thread in between
                pass
            return x
        x = encode(word, add_special_tokens=False).ids
        if len(word) <= self.max_word:
            with self._lock:
                if word not in d:
                    d[word] = x
                    self.bytes += self.ENTRY + len(word) + 40 * len(x)
                    while self.bytes > self.max_bytes and d:
                        k, v = d.popitem(last=False)
                        self.bytes -= self.ENTRY + len(k) + 40 * len(v)
        return x


# columns of WordTable._rows (int32: 20 bytes a word to gather); recency is in WordTable._stamp (int64)
_WS, _WL, _NS, _NL, _BYTES = range(5)


class WordTable:
    """word → (WordPiece ids, n-gram word ids), bounded; see the module docstring. Thread-safe (one lock per
    call: the lookups are C loops, so there is little to run in parallel anyway)."""

    ENTRY = 150

    def __init__(self, tokenizer, max_bytes: int = 16 << 20, max_word: int = 48):
        self.tokenizer, self.max_bytes, self.max_word = tokenizer, int(max_bytes), max_word
        self._lock = threading.Lock()
        self._index = None  # the compiled scan's hash of the words (static_kernels.WordIndex), made on first use
        self._reset(None)

    def _reset(self, ng_words: dict | None) -> None:
        self._ng_words = ng_words  # the n-gram vocabulary's word → id the rows were built for
        self._index = None
        self._d: dict[str, int] = {}
        self._keys: list[str | None] = []  # row → word (None: a long word, kept for one call only)
        self._rows = np.zeros((0, 5), dtype=np.int32)
        self._stamp = np.zeros(0, dtype=np.int64)
        self._wp = np.zeros(0, dtype=np.int64)
        self._ng = np.zeros(0, dtype=np.int64)
        self._n = self._n_wp = self._n_ng = 0
        self.bytes = self._junk = self._tick = 0
        self._d[_SEPARATOR] = 0  # row 0: the batch separator, no token ids, one -1 n-gram id; never evicted
        self._keys.append(_SEPARATOR)
        self._rows, self._n = _append(self._rows, 0, np.array([[0, 0, 0, 1, 0]]))
        self._stamp, _ = _append(self._stamp, 0, [0])
        self._ng, self._n_ng = _append(self._ng, 0, [-1])

    def __len__(self) -> int:
        return len(self._d) - 1

    def __contains__(self, word: str) -> bool:
        return word in self._d and word != _SEPARATOR

    # -- one call ---------------------------------------------------------------------------------------
    def encode(self, texts: list[str], limit: int, ngram_words: dict | None):
        """``(ids, ids_indptr, ngram_ids, ngram_indptr)`` of already-cleaned ``texts``: each text's first
        ``limit`` token ids, and (when ``ngram_words`` is given) its n-gram word ids (-1: not in the n-gram
        vocabulary; a -1 also starts every text after the first), both flat with CSR-style row pointers.

        A batch is joined with a separator word that no cleaned text contains (a lone surrogate), split in
        one call, and looked up in one ``map``; the separator's row has no token ids and one -1 n-gram id,
        so the texts' boundaries fall out of the cumulative counts at the separators."""
        words = texts[0].split() if len(texts) == 1 else _SEPARATED.join(texts).split()
        with self._lock:
            if ngram_words is not self._ng_words:
                self._reset(ngram_words)
            self._tick += 1
            rows = np.fromiter(map(self._d.get, words, repeat(-1)), dtype=np.int64, count=len(words))
            miss = np.flatnonzero(rows < 0)
            if len(miss):
                rows[miss] = self._add([words[i] for i in miss])
            meta = self._rows[rows]
            # recency: the call, then the position of the word's last use in it (numpy assigns in order)
            self._stamp[rows] = (self._tick << 32) + np.arange(len(rows))
            ids = ragged_gather(self._wp, meta[:, _WS], meta[:, _WL])
            ng = ragged_gather(self._ng, meta[:, _NS], meta[:, _NL]) if ngram_words is not None else None
            if self.bytes + self._junk > self.max_bytes:
                self._compact()
        if len(texts) == 1:
            if len(ids) > limit:
                ids = ids[:limit]
            return ids, np.array([0, len(ids)]), ng, None if ng is None else np.array([0, len(ng)])
        ends = np.flatnonzero(rows == 0)
        ids_ptr = np.concatenate([[0], np.cumsum(meta[:, _WL])[ends], [len(ids)]])
        n_ids = np.diff(ids_ptr)
        if len(n_ids) and n_ids.max() > limit:  # keep each text's first `limit` ids
            pos = np.arange(len(ids)) - np.repeat(ids_ptr[:-1], n_ids)
            ids = ids[pos < limit]
            ids_ptr = indptr_of(np.minimum(n_ids, limit))
        ng_ptr = None
        if ng is not None:
            ng_ptr = np.concatenate([[0], np.cumsum(meta[:, _NL])[ends] - 1, [len(ng)]])
        return ids, ids_ptr.astype(np.int64), ng, ng_ptr

    def run(self, texts: list[str], ngram_words: dict | None, kernel):
        """``kernel(row, word_ptr, rows, wp_pool, ng_pool)`` over already-cleaned ``texts``' words, found by the
        compiled scan (:mod:`protege.students.static_kernels`: no Python string per word), under the lock —
        a compaction renumbers rows, so nothing may hold them past this call."""
        from protege.students import static_kernels as K

        buf, text_ptr = K.utf8_batch(texts)
        with self._lock:
            if ngram_words is not self._ng_words:
                self._reset(ngram_words)
            if self._index is None:
                self._index = K.WordIndex()
                self._index.rebuild([None] + self._keys[1 : self._n])
            self._tick += 1
            row, start, end, word_ptr = self._index.scan(buf, text_ptr)
            miss = np.flatnonzero(row < 0)
            if len(miss):
                raw = buf.tobytes()
                row[miss] = self._add([raw[a:z].decode("utf-8") for a, z in zip(start[miss].tolist(), end[miss].tolist())])
            self._stamp[row] = (self._tick << 32) + np.arange(len(row))
            out = kernel(row, word_ptr, self._rows, self._wp, self._ng)
            if self.bytes + self._junk > self.max_bytes:
                self._compact()
        return out

    def _add(self, missed: list[str]) -> np.ndarray:
        """Rows for the words of ``missed`` (in order, repeats allowed), tokenizing each distinct one once."""
        new = list(dict.fromkeys(missed))
        enc = self.tokenizer.encode_batch(new, add_special_tokens=False) if len(new) > 8 else \
            [self.tokenizer.encode(w, add_special_tokens=False) for w in new]
        wp = [e.ids for e in enc]
        get = self._ng_words.get if self._ng_words is not None else None
        ng = [[get(t, -1) for t in _NGRAM_TOKEN.findall(w.lower())] for w in new] if get else [[] for _ in new]
        wl = np.fromiter(map(len, wp), dtype=np.int64, count=len(new))
        nl = np.fromiter(map(len, ng), dtype=np.int64, count=len(new))
        est = self.ENTRY + np.fromiter(map(len, new), dtype=np.int64, count=len(new)) + 40 * wl
        block = np.zeros((len(new), 5), dtype=np.int64)
        block[:, _WS] = self._n_wp + indptr_of(wl)[:-1]
        block[:, _WL], block[:, _NL], block[:, _BYTES] = wl, nl, est
        block[:, _NS] = self._n_ng + indptr_of(nl)[:-1]
        self._wp, self._n_wp = _append(self._wp, self._n_wp, [i for x in wp for i in x])
        self._ng, self._n_ng = _append(self._ng, self._n_ng, [i for x in ng for i in x])
        first = self._n
        self._stamp, _ = _append(self._stamp, self._n, np.full(len(new), self._tick << 32))
        self._rows, self._n = _append(self._rows, self._n, block)
        keep = [len(w) <= self.max_word for w in new]
        self._keys += [w if k else None for w, k in zip(new, keep)]
        mine = {w: first + j for j, w in enumerate(new)}
        if self._index is not None:
            self._index.add(first, [w if k else None for w, k in zip(new, keep)])
        self._d.update((w, r) for w, r in mine.items() if len(w) <= self.max_word)
        kept = np.asarray(keep, dtype=bool)
        self.bytes += int(est[kept].sum())
        self._junk += int(est[~kept].sum())
        return np.fromiter(map(mine.__getitem__, missed), dtype=np.int64, count=len(missed))

    def _compact(self) -> None:
        """Drop one-call rows and, past the bound, the least recently used words; renumber and repack."""
        rows = self._rows[: self._n]
        live = np.flatnonzero(np.fromiter((k is not None for k in self._keys), dtype=bool, count=self._n))
        live = live[1:]  # row 0, the separator, stays row 0
        if self.bytes > self.max_bytes:
            order = np.argsort(self._stamp[live], kind="stable")  # least recently used first
            excess = self.bytes - (self.max_bytes * 3) // 4
            n_out = int(np.searchsorted(np.cumsum(rows[live[order], _BYTES]), excess)) + 1
            live = np.sort(live[order[n_out:]])
        live = np.concatenate([[0], live])
        keys = [self._keys[r] for r in live]
        meta = rows[live].copy()
        wp = ragged_gather(self._wp, meta[:, _WS], meta[:, _WL])
        ng = ragged_gather(self._ng, meta[:, _NS], meta[:, _NL])
        meta[:, _WS], meta[:, _NS] = indptr_of(meta[:, _WL])[:-1], indptr_of(meta[:, _NL])[:-1]
        self._rows, self._wp, self._ng, self._stamp = meta, wp, ng, self._stamp[live]
        self._n, self._n_wp, self._n_ng = len(meta), len(wp), len(ng)
        self._keys = keys
        self._d = dict(zip(keys, range(len(keys))))
        self.bytes, self._junk = int(meta[:, _BYTES].sum()), 0
        if self._index is not None:
            self._index.rebuild([None] + keys[1:])


def _append(arr: np.ndarray, n: int, new) -> tuple[np.ndarray, int]:
    """``arr[:n]`` + ``new`` in ``arr`` (grown by doubling when full); returns (array, new length)."""
    new = np.asarray(new, dtype=arr.dtype).reshape((-1,) + arr.shape[1:])
    end = n + len(new)
    if end > len(arr):
        grown = np.zeros((max(end, 2 * len(arr), 64),) + arr.shape[1:], dtype=arr.dtype)
        grown[:n] = arr[:n]
        arr = grown
    arr[n:end] = new
    return arr, end


class IntIndex:
    """int64 key → int64 value for a fixed key set, looked up a whole array at a time: an open-addressing
    hash table (multiplicative hash, linear probing without wrap-around, load ≤ 1/4, key and value side by
    side in one slot) where every key sits within ``window`` slots of its home — most keys are answered by
    their home slot, one memory access, where a ``searchsorted`` into the sorted keys costs ~log2(n)
    cache-missing steps. Absent keys give ``-1``."""

    MULT = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, keys: np.ndarray, values: np.ndarray):
        keys, values = np.asarray(keys, dtype=np.int64), np.asarray(values, dtype=np.int64)
        self.bits = max(int(np.ceil(np.log2(max(4 * len(keys), 2)))), 1)
        while True:
            self.window = 8 if self.bits < 24 else 32
            self.slots = np.full(((1 << self.bits) + self.window, 2), -1, dtype=np.int64)  # (key, value)
            pending, home, probe = np.arange(len(keys)), self._home(keys), 0
            while len(pending) and probe < self.window:
                pos = home[pending] + probe
                free = self.slots[pos, 0] == -1
                slot, first = np.unique(pos[free], return_index=True)  # one winner per free slot per round
                won = pending[free][first]
                self.slots[slot, 0], self.slots[slot, 1] = keys[won], values[won]
                placed = np.zeros(len(keys), dtype=bool)
                placed[won] = True
                pending, probe = pending[~placed[pending]], probe + 1
            if not len(pending):
                break
            self.bits += 1  # a cluster longer than the window: spread the keys over twice the slots
        self._win = np.arange(self.window, dtype=np.int64)

    def _home(self, keys: np.ndarray) -> np.ndarray:
        return ((keys.astype(np.uint64) * self.MULT) >> np.uint64(64 - self.bits)).astype(np.int64)

    def get(self, keys: np.ndarray) -> np.ndarray:
        """Values of ``keys`` (keys must be ≥ 0), ``-1`` where a key is not in the index."""
        home = self._home(keys)
        at = self.slots[home]
        out = np.where(at[:, 0] == keys, at[:, 1], -1)
        far = np.flatnonzero((at[:, 0] != keys) & (at[:, 0] != -1))  # home taken by another key: look on
        if len(far):
            pos = home[far, None] + self._win
            near = self.slots[pos]
            match = near[:, :, 0] == keys[far, None]
            j = match.argmax(1)
            rows = np.arange(len(far))
            out[far] = np.where(match[rows, j], near[rows, j, 1], -1)
        return out

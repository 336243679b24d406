"""Compiled inference for the static student (numba): UTF-8 bytes in, logits out, no Python work per word.

The numpy path (:class:`~protege.students.words.WordTable` + ``StaticClassifier._embed`` + the n-gram
``cells``) already does no Python work per *token*, but it still makes one Python string per word
(``str.split``) and hashes it in a dict, then runs ~40 numpy calls that each pass over the batch. On the demo's
BBC articles (~390 words) that is ~0.35 ms for one article and ~5,000 articles/s batched — most of it the
string split and lookup (~45%), the sparse product for the embedding mean (~20%) and the n-gram hash lookups.

Here a batch is encoded to UTF-8 once and two compiled loops do the rest:

* :func:`scan` splits the bytes exactly as ``str.split()`` does (every character for which ``str.isspace``
  holds — ASCII and the 19 multi-byte ones), hashes each word (FNV-1a, 64 bit) and finds its row of the word
  table in an open-addressing table, checking the word's bytes (so a hash collision is a miss, never a wrong
  word). Words not found are handed back; the caller tokenizes them once and adds them (:class:`WordIndex`).
* :func:`logits` walks each text's words once: adds the IDF-scaled embedding rows of its first ``limit``
  WordPiece ids, collects its n-gram word ids, looks its 1- and 2-grams up (the same integer keys and hash
  index as :meth:`NgramFeatures._index`), counts them in a scratch array, and writes
  ``x / |x| @ W + b + tfidf / |tfidf| @ V`` — the same arithmetic as the numpy path, summed in another order
  (float32 either way: probabilities agree to ~1e-6; the tests check it).

Used by ``StaticClassifier.decision_function`` when numba imports, the tokenizer splits per word and the
n-grams are word n-grams; the numpy path stays for everything else (and as the reference in the tests).
``cache=True`` keeps the compiled code on disk beside this module, so only the first process compiles (~seconds).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import threading

import numpy as np

_COMPILED = False
_LOCK = threading.Lock()

@functools.cache
def available() -> bool:
    """numba is installed (a dependency; this is for platforms without its wheels: the numpy path serves).
    Cached: it is asked on every ``decision_function`` call, and ``find_spec`` walks ``sys.path``."""
    return importlib.util.find_spec("numba") is not None


def compile_kernels() -> None:
    """Turn this module's kernels into numba functions, once per process, on first use — importing numba costs
    ~0.5 s, which a CLI command that never predicts should not pay. The helpers are inlined into their callers:
    a call that passes arrays costs reference-count updates (atomic) per array, more than a helper's work on one
    byte. ``cache=True`` keeps the machine code on disk beside this module, so only the first process compiles."""
    global _COMPILED
    if _COMPILED:
        return
    with _LOCK:
        if _COMPILED:
            return
        import numba

        g = globals()
        g["_ASCII_WS"], g["_MULTI_WS"] = _whitespace_tables()
        for name in ("_space_len", "_hash", "_find", "_index_get"):
            g[name] = numba.njit(cache=True, nogil=True, inline="always")(g[name])
        for name in ("scan", "_insert_all", "logits"):
            g[name] = numba.njit(cache=True, nogil=True)(g[name])
        _COMPILED = True


def _whitespace_tables() -> tuple[np.ndarray, np.ndarray]:
    """(256-entry table: byte is an ASCII whitespace, sorted packed UTF-8 codes of the multi-byte ones) —
    derived from Python's own ``str.isspace`` so the split is ``str.split()``'s exactly."""
    ascii_ws = np.zeros(256, dtype=np.uint8)
    multi = []
    for c in range(sys.maxunicode + 1):
        if chr(c).isspace():
            b = chr(c).encode("utf-8")
            if len(b) == 1:
                ascii_ws[b[0]] = 1
            else:
                multi.append(int.from_bytes(b, "big"))
    return ascii_ws, np.array(sorted(multi), dtype=np.int64)


_ASCII_WS = _MULTI_WS = None  # set by compile_kernels (the scan of every code point takes ~0.1 s)


def _space_len(buf, i, n, ascii_ws, multi_ws):
    """Bytes of the whitespace character starting at ``buf[i]`` (0: not whitespace)."""
    c = buf[i]
    if c < 0x80:
        return 1 if ascii_ws[c] else 0
    if c < 0xC2 or c > 0xE3:  # every multi-byte whitespace starts with C2, E1, E2 or E3
        return 0
    k = 2 if c < 0xE0 else 3
    if i + k > n:
        return 0
    code = 0
    for j in range(k):
        code = (code << 8) | buf[i + j]
    for m in multi_ws:
        if m == code:
            return k
    return 0


def _hash(buf, start, end):
    h = np.uint64(0xCBF29CE484222325)
    for j in range(start, end):
        h = (h ^ np.uint64(buf[j])) * np.uint64(0x100000001B3)
    return h if h != np.uint64(0) else np.uint64(1)  # 0 marks an empty slot


def _find(buf, start, end, h, keys, rows, pool, pstart, plen, mask):
    """Row of the word ``buf[start:end]`` (hash ``h``), or -1."""
    n = end - start
    s = np.int64(h & np.uint64(mask))
    while keys[s] != np.uint64(0):
        if keys[s] == h:
            r = rows[s]
            if plen[r] == n:
                p = pstart[r]
                same = True
                for j in range(n):
                    if pool[p + j] != buf[start + j]:
                        same = False
                        break
                if same:
                    return r
        s = (s + 1) & mask
    return -1


def scan(buf, text_ptr, keys, rows, pool, pstart, plen, mask, ascii_ws, multi_ws):
    """Split each text (``buf[text_ptr[i]:text_ptr[i + 1]]``) into words and find their rows.

    Returns ``(row, start, end, word_ptr)``: per word its row (-1: not in the table), its byte span, and per
    text the range of its words (``word_ptr``, CSR-style)."""
    n_texts = len(text_ptr) - 1
    cap = (len(buf) + 1) // 2 + n_texts + 1
    row = np.empty(cap, dtype=np.int64)
    w_start = np.empty(cap, dtype=np.int64)
    w_end = np.empty(cap, dtype=np.int64)
    word_ptr = np.zeros(n_texts + 1, dtype=np.int64)
    m = 0
    for t in range(n_texts):
        i, end = text_ptr[t], text_ptr[t + 1]
        while i < end:
            c = buf[i]  # the ASCII test written out here: through the helper it costs ~30x more
            k = ascii_ws[c] if c < 0x80 else _space_len(buf, i, end, ascii_ws, multi_ws)
            if k:
                i += k
                continue
            s = i
            while i < end:
                c = buf[i]
                k = ascii_ws[c] if c < 0x80 else _space_len(buf, i, end, ascii_ws, multi_ws)
                if k:
                    break
                i += 1
            h = _hash(buf, s, i)
            row[m] = _find(buf, s, i, h, keys, rows, pool, pstart, plen, mask)
            w_start[m], w_end[m] = s, i
            m += 1
        word_ptr[t + 1] = m
    return row[:m], w_start[:m], w_end[:m], word_ptr


def _insert_all(keys, rows, mask, new_rows, pool, pstart, plen):
    for r in new_rows:
        h = _hash(pool, pstart[r], pstart[r] + plen[r])
        s = np.int64(h & np.uint64(mask))
        while keys[s] != np.uint64(0):
            s = (s + 1) & mask
        keys[s], rows[s] = h, r


def _index_get(slots, bits, window, key):
    """``IntIndex.get`` for one key."""
    home = np.int64((np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - bits))
    for p in range(window):
        k = slots[home + p, 0]
        if k == key:
            return slots[home + p, 1]
        if k == -1:
            return -1
    return -1


def logits(row, word_ptr, meta, wp, ngp, limit, table, WT, b, uni, slots, bits, window, base, ng_n, ng_idf, V):
    """Per text: ``normalize(sum of its first `limit` WordPiece rows of `table`) @ WT.T + b`` plus, with
    ``ng_n`` ≥ 1, its 1-grams' (and with 2, 2-grams') TF-IDF row (sublinear TF, L2-normalised) ``@ V``."""
    n_texts = len(word_ptr) - 1
    k, dims = WT.shape
    out = np.empty((n_texts, k), dtype=np.float32)
    x = np.empty(dims, dtype=np.float32)
    count = np.zeros(max(len(ng_idf), 1), dtype=np.int32)
    touched = np.empty(64, dtype=np.int64)
    for t in range(n_texts):
        x[:] = 0.0
        used = 0
        n_touched = 0
        prev = -1
        for j in range(word_ptr[t], word_ptr[t + 1]):
            r = row[j]
            if used < limit:
                s = meta[r, 0]
                take = min(meta[r, 1], limit - used)
                for q in range(s, s + take):
                    e = table[wp[q]]
                    for d in range(dims):
                        x[d] += e[d]
                used += take
            if ng_n == 0:
                continue
            s = meta[r, 2]
            for q in range(s, s + meta[r, 3]):
                w = ngp[q]
                if w < 0:
                    prev = -1
                    continue
                for g in range(2):
                    if g == 0:
                        c = uni[w + 1]
                    elif prev >= 0 and ng_n >= 2:
                        c = _index_get(slots, bits, window, (prev + 1) * base + w + 1)
                    else:
                        c = -1
                    if c < 0:
                        continue
                    if count[c] == 0:
                        if n_touched == len(touched):
                            grown = np.empty(2 * len(touched), dtype=np.int64)
                            grown[:n_touched] = touched
                            touched = grown
                        touched[n_touched] = c
                        n_touched += 1
                    count[c] += 1
                prev = w
        ss = np.float32(0.0)
        for d in range(dims):
            ss += x[d] * x[d]
        inv = np.float32(1.0) / max(np.float32(np.sqrt(ss)), np.float32(1e-9))
        for c in range(k):
            acc = np.float32(0.0)
            wc = WT[c]
            for d in range(dims):
                acc += x[d] * wc[d]
            out[t, c] = acc * inv + b[c]
        if n_touched:
            ss = np.float32(0.0)
            for q in range(n_touched):
                c = touched[q]
                wgt = (np.float32(1.0) + np.log(np.float32(count[c]))) * ng_idf[c]
                ss += wgt * wgt
            inv = np.float32(1.0) / max(np.float32(np.sqrt(ss)), np.float32(1e-12))
            for q in range(n_touched):
                c = touched[q]
                wgt = (np.float32(1.0) + np.log(np.float32(count[c]))) * ng_idf[c] * inv
                count[c] = 0
                for m in range(k):
                    out[t, m] += wgt * V[c, m]
    return out


class WordIndex:
    """The compiled side of a :class:`~protege.students.words.WordTable`: its kept words' UTF-8 bytes (by
    row) and an open-addressing hash of them (load ≤ 1/2), kept in step with the table — new rows are
    inserted, a compaction (rows renumbered) rebuilds it."""

    def __init__(self) -> None:
        compile_kernels()
        self.keys = np.zeros(64, dtype=np.uint64)
        self.rows = np.zeros(64, dtype=np.int64)
        self.pool = np.zeros(0, dtype=np.uint8)
        self.pstart = np.zeros(0, dtype=np.int64)
        self.plen = np.full(0, -1, dtype=np.int64)
        self.n_keys = 0

    @property
    def mask(self) -> int:
        return len(self.keys) - 1

    def rebuild(self, words: list[str | None]) -> None:
        """Every row's word (``None``: a row not to find — a long word or the separator)."""
        self.__init__()
        self.add(0, words)

    def add(self, first_row: int, words: list[str | None]) -> None:
        """Rows ``first_row, first_row + 1, …`` hold ``words`` (``None``: not to be found)."""
        enc = [w.encode("utf-8") if w is not None else b"" for w in words]
        lens = np.fromiter(map(len, enc), dtype=np.int64, count=len(enc))
        end = first_row + len(words)
        if end > len(self.pstart):  # grow the per-row arrays (rows only ever append between rebuilds)
            size = max(end, 2 * len(self.pstart), 64)
            self.pstart = np.concatenate([self.pstart, np.zeros(size - len(self.pstart), dtype=np.int64)])
            self.plen = np.concatenate([self.plen, np.full(size - len(self.plen), -1, dtype=np.int64)])
        self.pstart[first_row:end] = len(self.pool) + np.cumsum(lens) - lens
        self.plen[first_row:end] = np.where([w is not None for w in words], lens, -1)
        self.pool = np.concatenate([self.pool, np.frombuffer(b"".join(enc), dtype=np.uint8)])
        new = first_row + np.flatnonzero(self.plen[first_row:end] >= 0)
        if 2 * (self.n_keys + len(new)) > len(self.keys):  # keep the load ≤ 1/2: rehash everything
            size = 1 << int(np.ceil(np.log2(max(4 * (self.n_keys + len(new)), 64))))
            self.keys, self.rows = np.zeros(size, dtype=np.uint64), np.zeros(size, dtype=np.int64)
            new = np.flatnonzero(self.plen[:end] >= 0)
            self.n_keys = 0
        _insert_all(self.keys, self.rows, self.mask, new.astype(np.int64), self.pool, self.pstart, self.plen)
        self.n_keys += len(new)

    def scan(self, buf: np.ndarray, text_ptr: np.ndarray):
        return scan(buf, text_ptr, self.keys, self.rows, self.pool, self.pstart, self.plen, self.mask,
                    _ASCII_WS, _MULTI_WS)


def utf8_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(bytes of all texts, CSR-style byte offsets) — texts already cleaned of lone surrogates."""
    enc = [t.encode("utf-8") for t in texts]
    ptr = np.zeros(len(enc) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, enc), dtype=np.int64, count=len(enc)), out=ptr[1:])
    return np.frombuffer(b"".join(enc) if len(enc) > 1 else enc[0], dtype=np.uint8), ptr

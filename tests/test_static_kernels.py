"""The compiled static-student path (numba) gives the numpy path's numbers.

The numpy path is the reference (it is checked against the tokenizer, string n-grams and a student saved by
older code in test_static_equivalence.py); here the two run side by side on texts made to hit the compiled
scan's edge cases: every character ``str.isspace`` calls whitespace, multi-byte text, words past the word
table's length limit, truncation, empty texts, and word tables small enough to compact between calls.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from protege.students import static_kernels as K
from protege.students.classifier import StaticClassifier
from protege.students.ngrams import NgramFeatures
from test_static_equivalence import CORPUS, FIXTURE, PROBES, tiny_tokenizer

pytestmark = pytest.mark.skipif(not K.available(), reason="numba is not installed")

WHITESPACE = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]


def _texts(seed: int, n: int) -> list[str]:
    """Random texts from corpus words, odd characters and every kind of whitespace between them."""
    rng = np.random.default_rng(seed)
    words = " ".join(CORPUS).split() + ["東京", "naïve", "ΣΟΦΟΣ", "x" * 60, "\u00e9t\u00e9", "🙂ok", "a\u200bb"]
    out = []
    for _ in range(n):
        k = int(rng.integers(0, 60))
        parts = []
        for _ in range(k):
            parts.append(words[rng.integers(len(words))])
            parts.append("".join(rng.choice(WHITESPACE, size=int(rng.integers(1, 3)))))
        out.append("".join(parts))
    return out


def _both(clf: StaticClassifier, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert clf._compiled()
    fast = clf.decision_function(texts)
    clf.use_compiled = False
    assert not clf._compiled()
    ref = clf.decision_function(texts)
    clf.use_compiled = None
    return fast, ref


def test_the_scan_splits_exactly_like_str_split():
    texts = PROBES[:8] + _texts(0, 50) + ["", " ", "\u3000a\u3000", "é\u00a0é", "\x1cx\x1d", "a" + "\u2003" * 5 + "b"]
    idx = K.WordIndex()
    idx.rebuild([None, "the", "東京"])
    buf, ptr = K.utf8_batch(texts)
    row, start, end, word_ptr = idx.scan(buf, ptr)
    raw = buf.tobytes()
    for i, t in enumerate(texts):
        got = [raw[a:z].decode("utf-8") for a, z in zip(start[word_ptr[i]:word_ptr[i + 1]], end[word_ptr[i]:word_ptr[i + 1]])]
        assert got == t.split(), t
    words = [raw[a:z].decode("utf-8") for a, z in zip(start, end)]
    assert row.tolist() == [{"the": 1, "東京": 2}.get(w, -1) for w in words]


def test_the_whitespace_table_is_pythons():
    K.compile_kernels()
    want = {c.encode("utf-8") for c in WHITESPACE}
    got = {bytes([b]) for b in np.flatnonzero(K._ASCII_WS)} | {int(m).to_bytes(2 if m < 1 << 16 else 3, "big")
                                                               for m in K._MULTI_WS}
    assert got == want and len(want) == 29


def test_compiled_logits_equal_the_numpy_path_on_a_saved_student():
    clf = StaticClassifier.from_pretrained(FIXTURE)
    texts = PROBES + _texts(1, 200)
    fast, ref = _both(clf, texts)
    np.testing.assert_allclose(fast, ref, atol=2e-5, rtol=0)
    single = np.concatenate([clf.decision_function([t]) for t in texts[:40]])
    np.testing.assert_allclose(single, ref[:40], atol=2e-5, rtol=0)
    assert clf.decision_function([]).shape == (0, len(clf.labels))


@pytest.mark.parametrize("n", [0, 1, 2])
def test_compiled_logits_with_no_unigram_or_bigram_block(n):
    tok = tiny_tokenizer()
    rng = np.random.default_rng(n)
    feats = NgramFeatures(n, 1).fit(CORPUS) if n else None
    clf = StaticClassifier(rng.normal(size=(tok.get_vocab_size(), 8)).astype(np.float32), tok, ["a", "b", "c"],
                           max_tokens=25, ngrams=feats)
    clf.fit_idf(CORPUS)
    clf.W = rng.normal(size=(8, 3)).astype(np.float32)
    clf.b = rng.normal(size=3).astype(np.float32)
    if feats is not None:
        clf.V = rng.normal(size=(len(feats), 3)).astype(np.float32)
    fast, ref = _both(clf, PROBES + _texts(2, 100))
    np.testing.assert_allclose(fast, ref, atol=2e-5, rtol=0)
    clf.W = clf.W * 2  # new weights: the compiled path must not keep the old ones
    fast, ref = _both(clf, CORPUS)
    np.testing.assert_allclose(fast, ref, atol=2e-5, rtol=0)


def test_a_small_word_table_compacts_between_calls_and_stays_exact():
    clf = StaticClassifier.from_pretrained(FIXTURE)
    clf._word_cache.max_bytes = 4_000
    for seed in range(6):
        texts = _texts(10 + seed, 40) + [f"w{seed}x{i} the profit" for i in range(30)]
        fast, ref = _both(clf, texts)
        np.testing.assert_allclose(fast, ref, atol=2e-5, rtol=0)
        assert clf._word_cache.bytes <= 4_000

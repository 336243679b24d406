"""The vectorised static student gives the numbers the per-text one gave.

``tests/data/static_student_v0`` is a tiny static student (8-d embeddings, a 300-token WordPiece tokenizer,
word 1–2-grams, max_tokens 40) saved by the code before the word table (git 34fcbe3), with that code's
probabilities and token ids on ``PROBES`` (texts picked to hit the edge cases: truncation, whitespace runs,
unicode whitespace, the final-sigma rule, lone surrogates, words past the cache's length limit, empty
texts). The rest checks the parts against plain references: the n-gram rows against string n-grams
counted the scikit-learn way, the word table's ids and n-gram words against the tokenizer and the regex
run on the whole text, the hash index against a dict, and the table's bound.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from protege.students.classifier import StaticClassifier
from protege.students.ngrams import NgramFeatures, grams
from protege.students.words import IntIndex, WordTable, clean_text

FIXTURE = Path(__file__).parent / "data" / "static_student_v0"

CORPUS = [
    "Shares in the carmaker fell 5% after it cut its profit forecast, blaming weak sales.",
    "The singer's new album went straight to number one in the charts.",
    "The prime minister faced questions in parliament over the election pledge.",
    "The striker scored twice as the club won the cup final; the coach praised the defence.",
    "The firm unveiled a faster mobile phone chip and new software to protect home computers.",
    "Profit at the bank rose as sales of the new phone beat forecasts, shares up 3%.",
    "Ministers said the election would be held in May, the party's leader told parliament.",
    "The club's striker won an award; the singer and the coach went to the final.",
]

PROBES = [
    *CORPUS,
    "",
    "   ",
    "!!! ... ,,,",
    "the the the the shares shares fell fell",
    "Shares\tin\nthe  carmaker\u00a0fell\u2003after it\u3000cut\x1cits profit",  # unicode whitespace
    "ΟΔΟΣ ΣΑΣ Σ σ ς the ΣΟΦΟΣ-ΣΟΦΟΣ",  # final sigma: lower-casing depends on the neighbours
    "naïve résumé café — don't re-run it: e-mail@example.com 東京 x2 £5",
    "lone \ud800 surrogate \udfff here and a pair \ud83d\ude00 too",
    "supercalifragilisticexpialidocious" * 3 + " the profit " + "x" * 60,  # words past max_word
    " ".join(["the club won the cup final"] * 12),  # past max_tokens (40)
    "internationalization internationalization software",
    "The The THE tHe",
]


def tiny_tokenizer():
    """A BERT-style WordPiece tokenizer with ~300 tokens: the corpus words, single characters, ## pieces."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    words = sorted({w for t in CORPUS for w in re.findall(r"[a-z]+", t.lower())})
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~£—")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + chars + [f"##{c}" for c in chars[:36]] + words
    vocab = list(dict.fromkeys(vocab))
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok


@pytest.fixture(scope="module")
def reference():
    return json.loads((FIXTURE / "reference.json").read_text(encoding="utf-8"))


def test_a_student_saved_by_the_old_code_loads_and_predicts_the_same(reference):
    clf = StaticClassifier.from_pretrained(FIXTURE)
    texts = PROBES  # (reference.json holds them too; JSON merges the surrogate pair into one character)
    assert len(reference["texts"]) == len(texts)
    np.testing.assert_allclose(clf.predict_proba(texts), reference["batched"], atol=1e-6, rtol=0)
    single = np.concatenate([clf.predict_proba([t]) for t in texts])
    np.testing.assert_allclose(single, reference["single"], atol=1e-6, rtol=0)
    assert clf._ids(texts) == reference["ids"]
    for _ in range(2):  # answered from the word table the second time
        np.testing.assert_allclose(clf.predict_proba(texts[::-1]), reference["batched"][::-1], atol=1e-6, rtol=0)


def test_batches_of_any_size_and_order_give_the_same_rows():
    clf = StaticClassifier.from_pretrained(FIXTURE)
    want = clf.predict_proba(PROBES)
    rng = np.random.default_rng(0)
    for size in (1, 2, 3, 7, len(PROBES)):
        order = rng.permutation(len(PROBES))[:size]
        np.testing.assert_allclose(clf.predict_proba([PROBES[i] for i in order]), want[order], atol=1e-6, rtol=0)
    enc = np.concatenate([clf.encode([t]) for t in PROBES])
    np.testing.assert_allclose(clf.encode(PROBES), enc, atol=1e-6, rtol=0)


def _reference_tfidf(f: NgramFeatures, text: str) -> dict[int, float]:
    """Sublinear TF-IDF of one text from string n-grams (scikit-learn's recipe), L2-normalised."""
    counts = Counter(g for g in grams(text, f.n) if g in f.vocab)
    w = {f.vocab[g]: (1 + math.log(c)) * float(f.idf[f.vocab[g]]) for g, c in counts.items()}
    norm = math.sqrt(sum(v * v for v in w.values())) or 1.0
    return {k: v / norm for k, v in w.items()}


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ngram_rows_equal_string_ngrams_counted_one_text_at_a_time(n):
    f = NgramFeatures(n, 1).fit(CORPUS + PROBES[8:12])
    X = f.transform(PROBES)
    clf = StaticClassifier(np.zeros((tiny_tokenizer().get_vocab_size(), 4), np.float32), tiny_tokenizer(), ["a", "b"],
                           ngrams=f)
    _, _, Y = clf._token_ids(PROBES)  # the word table's path
    for i, t in enumerate(PROBES):
        want = _reference_tfidf(f, t)
        for M in (X, Y):
            row = M.getrow(i)
            assert dict(zip(row.indices.tolist(), row.data.tolist())) == pytest.approx(want, abs=1e-6), t[:40]
            assert list(row.indices) == sorted(row.indices)


def test_word_table_gives_the_tokenizer_ids_and_the_regex_ngram_words():
    f = NgramFeatures(2, 1).fit(CORPUS + PROBES)
    words = f._index()[0]
    tok = tiny_tokenizer()
    table = WordTable(tok, max_bytes=3_000)  # small: compactions happen between calls
    texts = [clean_text(t) for t in PROBES]
    for rnd in range(3):
        batch = texts if rnd != 1 else texts[::-1]
        ids, ptr, ng, ng_ptr = table.encode(batch, 40, words)
        assert table.bytes <= 3_000
        for i, t in enumerate(batch):
            # per whitespace-separated word, as before the word table: the same as the whole text except where
            # str.split and the tokenizer disagree on what separates words ("\x1c"-"\x1f": Python splits, BERT's
            # normaliser drops them and joins the words) — kept as it was, so old students predict the same
            per_word = [j for w in t.split() for j in tok.encode(w, add_special_tokens=False).ids][:40]
            assert ids[ptr[i] : ptr[i + 1]].tolist() == per_word
            if "\x1c" not in t:
                assert per_word == tok.encode(t, add_special_tokens=False).ids[:40]
            want = [words.get(w, -1) for w in re.findall(r"(?u)\b\w\w+\b", t.lower())]
            got = ng[ng_ptr[i] : ng_ptr[i + 1]].tolist()
            assert (got[1:] if i else got) == want  # every text after the first starts with a -1 separator
            if i:
                assert got[0] == -1


def test_word_table_keeps_recent_words_and_its_bound():
    tok = tiny_tokenizer()
    table = WordTable(tok, max_bytes=20_000)
    rng = np.random.default_rng(1)
    for _ in range(30):
        texts = [" ".join(f"w{rng.integers(1 << 40)}" for _ in range(30)) + " keepme" for _ in range(5)]
        ids, ptr, _, _ = table.encode(texts, 10_000, None)
        assert ids.tolist() == [i for t in texts for i in tok.encode(t, add_special_tokens=False).ids]
        assert table.bytes <= 20_000
    assert "keepme" in table and 0 < len(table) < 30 * 5 * 30 / 4
    assert clean_text("\ud800") not in table  # the batch separator is not a word


def test_int_index_matches_a_dict():
    rng = np.random.default_rng(2)
    keys = np.unique(rng.integers(0, 1 << 50, 5_000))
    vals = rng.integers(0, 1 << 20, len(keys))
    idx = IntIndex(keys, vals)
    probe = np.concatenate([keys, rng.integers(0, 1 << 50, 5_000), keys[:10] + 1])
    d = dict(zip(keys.tolist(), vals.tolist()))
    assert idx.get(probe).tolist() == [d.get(k, -1) for k in probe.tolist()]
    assert IntIndex(np.zeros(0, np.int64), np.zeros(0, np.int64)).get(np.arange(5)).tolist() == [-1] * 5

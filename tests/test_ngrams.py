"""NgramFeatures against scikit-learn's TfidfVectorizer: same n-grams, same IDF, same rows."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from protege.students.ngrams import NgramFeatures, grams

TEXTS = ["The striker scored twice, and the coach praised the defence.",
         "Shares fell 5% after the carmaker cut its profit forecast.",
         "The prime minister faced questions over the election pledge.",
         "Shares in the club fell after the striker was sold — a naïve deal, fans said.",
         "", "a b c", "Café owners said the café's profit fell; the coach agreed."]


@pytest.mark.parametrize("n,min_df", [(1, 1), (2, 1), (2, 2), (3, 1)])
def test_matches_tfidfvectorizer(n, min_df):
    ref = TfidfVectorizer(ngram_range=(1, n), sublinear_tf=True, min_df=min_df, dtype=np.float32).fit(TEXTS)
    ours = NgramFeatures(n, min_df).fit(TEXTS)
    assert ours.vocab == ref.vocabulary_
    np.testing.assert_allclose(ours.idf, ref.idf_, rtol=1e-6)
    new = TEXTS + ["Unseen words only", "the the the striker"]
    np.testing.assert_allclose(ours.transform(new).toarray(), ref.transform(new).toarray(), atol=1e-6)


def test_grams_are_sklearns_analyzer():
    ana = TfidfVectorizer(ngram_range=(1, 2)).build_analyzer()
    for t in TEXTS:
        assert grams(t, 2) == ana(t)


def test_max_features_keeps_the_most_frequent():
    f = NgramFeatures(1, 1, max_features=2).fit(TEXTS)
    # document frequencies: the 5, fell 3, then ties at 2 (coach, profit, said, shares, striker) → by n-gram
    assert set(f.vocab) == {"the", "fell"}


def test_empty_and_unknown_rows_are_zero():
    f = NgramFeatures(2, 1).fit(TEXTS[:3])
    X = f.transform(["", "zzz qqq"])
    assert X.shape == (2, len(f)) and X.nnz == 0


def test_json_round_trip():
    f = NgramFeatures(2, 1).fit(TEXTS)
    g = NgramFeatures.from_json(f.to_json())
    assert (g.transform(TEXTS) != f.transform(TEXTS)).nnz == 0

"""StaticClassifier on a small random embedding table: learning, persistence, early stopping, tokenizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protege.losses import distillation_loss
from protege.students.classifier import StaticClassifier
from protege.students.ngrams import NgramFeatures
from tiny import minilm_tokenizer, smollm2_tokenizer, wordlevel_tokenizer

LABELS = ["red", "green", "blue"]
CUES = {"red": ["cherry", "tomato", "ruby", "brick"], "green": ["grass", "lime", "leaf", "moss"],
        "blue": ["ocean", "sky", "sapphire", "denim"]}
FILLER = [f"w{i}" for i in range(40)]
VOCAB = [w for ws in CUES.values() for w in ws] + FILLER


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: extra threads only spin


def make_data(n: int, seed: int, noise: float = 0.0):
    """Texts of 6 filler words + 1 cue word; teacher probs 0.8 on the cue's label (flipped with prob noise)."""
    rng = np.random.default_rng(seed)
    texts, P, y = [], [], []
    for i in range(n):
        k = i % len(LABELS)
        words = list(rng.choice(FILLER, 6)) + [rng.choice(CUES[LABELS[k]])]
        rng.shuffle(words)
        texts.append(" ".join(words))
        t = k if rng.random() >= noise else (k + 1) % len(LABELS)
        p = np.full(len(LABELS), 0.1)
        p[t] = 0.8
        P.append(p)
        y.append(k)
    return texts, np.array(P, dtype=np.float32), np.array(y)


def make_clf(dims: int = 16, seed: int = 0) -> StaticClassifier:
    """Random table, except that each label's cue words share a direction (as a real encoder's would)."""
    tok = wordlevel_tokenizer(VOCAB)
    emb = np.random.default_rng(seed).normal(size=(tok.get_vocab_size(), dims)).astype(np.float32)
    vocab = tok.get_vocab()
    for k, lab in enumerate(LABELS):
        for w in CUES[lab]:
            emb[vocab[w], k] += 8.0
    return StaticClassifier(emb, tok, LABELS)


def make_ngram_clf(seed: int = 0, dims: int = 16) -> StaticClassifier:
    """Random embeddings, no label directions: what is learnt comes mostly from the n-gram block."""
    tok = wordlevel_tokenizer(VOCAB)
    emb = np.random.default_rng(seed).normal(size=(tok.get_vocab_size(), dims)).astype(np.float32)
    return StaticClassifier(emb, tok, LABELS, ngrams=NgramFeatures(2, min_df=1))


def accuracy(clf, texts, y) -> float:
    return float(np.mean([LABELS.index(p) == t for p, t in zip(clf.predict(texts), y)]))


def test_fit_separable_data_reaches_high_accuracy():
    tr_x, tr_p, _ = make_data(150, seed=0)
    te_x, _, te_y = make_data(90, seed=1)
    clf = make_clf()
    before = accuracy(clf, te_x, te_y)
    clf.fit(tr_x, tr_p, seed=0, dense_weight=1.0)
    acc = accuracy(clf, te_x, te_y)
    assert acc >= 0.95 and before < 0.6, (before, acc)
    proba = clf.predict_proba(te_x)
    assert proba.shape == (90, 3) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert clf.n_params == clf.table.size + 16 * 3 + 3
    assert clf.history[-1]["objective"] < clf.history[0]["objective"]


def test_ngram_block_learns_what_the_embeddings_cannot():
    tr_x, tr_p, _ = make_data(150, seed=0)
    te_x, _, te_y = make_data(90, seed=1)
    # 2-d random embeddings: the mean of 7 words' vectors cannot tell 3 labels apart
    dense_only = StaticClassifier(make_ngram_clf(dims=2).base, wordlevel_tokenizer(VOCAB), LABELS).fit(tr_x, tr_p)
    both = make_ngram_clf(dims=2).fit(tr_x, tr_p)
    assert accuracy(dense_only, te_x, te_y) < 0.7
    assert accuracy(both, te_x, te_y) >= 0.95
    assert both.V.shape == (len(both.ngrams), 3) and both.n_params == both.table.size + both.W.size + both.V.size + 3


def test_hard_label_fit_is_scikit_learns_logistic_regression():
    """alpha=0, no class weights: the objective is exactly sklearn's L2 multinomial LR on the same features."""
    import scipy.sparse as sp
    from sklearn.linear_model import LogisticRegression

    tr_x, tr_p, _ = make_data(120, seed=10, noise=0.2)
    clf = make_ngram_clf().fit(tr_x, tr_p, alpha=0.0, c=3.0, dense_weight=0.5, max_iter=500)
    X = sp.hstack([sp.csr_matrix(clf.encode(tr_x) * 0.5), clf.ngrams.transform(tr_x)]).tocsr()
    ref = LogisticRegression(C=3.0, tol=1e-8, max_iter=5000).fit(X, tr_p.argmax(1))
    ours = clf.predict_proba(tr_x)
    np.testing.assert_allclose(ours, ref.predict_proba(X), atol=2e-3)
    np.testing.assert_allclose(clf.V, ref.coef_.T[16:] - ref.coef_.T[16:].mean(1, keepdims=True)
                               + clf.V.mean(1, keepdims=True), atol=2e-2)


@pytest.mark.parametrize("alpha,temperature", [(0.0, 1.0), (1.0, 1.0), (1.0, 4.0), (0.3, 2.0)])
def test_alpha_temperature_variants_learn(alpha, temperature):
    tr_x, tr_p, tr_y = make_data(120, seed=2)
    te_x, _, te_y = make_data(60, seed=3)
    clf = make_ngram_clf(seed=1).fit(tr_x, tr_p, hard_labels=tr_y, alpha=alpha, temperature=temperature,
                                     class_weights=np.ones(3, dtype=np.float32),
                                     sample_weight=np.linspace(0.5, 1.5, 120).astype(np.float32))
    assert accuracy(clf, te_x, te_y) >= 0.9
    assert all(np.isfinite(h["objective"]) for h in clf.history)


def test_soft_labels_shape_the_confidence():
    """Pure KD (alpha=1) on flat teacher targets stays unsure; hard-label training gets confident."""
    tr_x, tr_p, tr_y = make_data(120, seed=4)
    flat = np.full_like(tr_p, 0.2)
    flat[np.arange(len(tr_y)), tr_y] = 0.6
    soft = make_clf().fit(tr_x, flat, alpha=1.0, temperature=1.0, c=100.0, dense_weight=1.0)
    hard = make_clf().fit(tr_x, flat, alpha=0.0, c=100.0, dense_weight=1.0)
    s, h = soft.predict_proba(tr_x).max(1).mean(), hard.predict_proba(tr_x).max(1).mean()
    assert 0.5 < s < 0.72, s  # calibrated to the teacher's 0.6
    assert h > s + 0.1, (s, h)


def test_save_and_load_give_identical_predictions(tmp_path):
    tr_x, tr_p, _ = make_data(60, seed=5)
    clf = make_ngram_clf().fit(tr_x, tr_p)
    clf.save_pretrained(tmp_path / "s")
    assert {p.name for p in (tmp_path / "s").iterdir()} >= {"model.safetensors", "tokenizer.json", "config.json",
                                                           "ngrams.json"}
    back = StaticClassifier.from_pretrained(tmp_path / "s")
    te_x, _, _ = make_data(30, seed=6)
    te_x.append("unknown words only zzz")
    te_x.append("")
    np.testing.assert_array_equal(back.predict_proba(te_x), clf.predict_proba(te_x))
    assert back.labels == LABELS and back.max_tokens == clf.max_tokens
    assert back.ngrams.vocab == clf.ngrams.vocab
    np.testing.assert_array_equal(back.idf, clf.idf)


def test_from_pretrained_on_a_wrong_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a protege student folder"):
        StaticClassifier.from_pretrained(tmp_path)


def test_dev_is_scored_not_fitted():
    tr_x, tr_p, tr_y = make_data(90, seed=7)
    dv_x, dv_p, _ = make_data(60, seed=8, noise=0.4)
    a = make_ngram_clf().fit(tr_x, tr_p, hard_labels=tr_y, dev=(dv_x, dv_p))
    b = make_ngram_clf().fit(tr_x, tr_p, hard_labels=tr_y)
    np.testing.assert_array_equal(a.V, b.V)  # the dev split never moves the fit
    dev = a.history[-1]
    assert 0.4 < dev["dev_agreement"] < 0.8  # 40% of the dev teacher's labels are flipped
    dl = torch.tensor(a.decision_function(dv_x))
    assert dev["dev_loss"] == pytest.approx(float(distillation_loss(dl, torch.tensor(dv_p))), abs=1e-5)


def test_fit_is_deterministic_given_seed():
    tr_x, tr_p, _ = make_data(60, seed=9)
    a = make_ngram_clf().fit(tr_x, tr_p, seed=3)
    b = make_ngram_clf().fit(tr_x, tr_p, seed=3)
    np.testing.assert_array_equal(a.W, b.W)
    np.testing.assert_array_equal(a.V, b.V)


def test_idf_downweights_frequent_tokens():
    clf = make_clf()
    clf.fit_idf(["cherry w1", "grass w1", "ocean w1", "sky w1"])
    vocab = clf.tokenizer.get_vocab()
    assert clf.idf[vocab["w1"]] < clf.idf[vocab["cherry"]] < clf.idf[vocab["w2"]]


# -- tokenizing through the word cache ------------------------------------------------------------

PROSE = [
    "Hello, world! The cat's naïve résumé costs $3.50 (approx.) — or 3,50 €.",
    "  leading and trailing spaces\tand\ttabs\nand\n\nnewlines  ",
    "UPPER lower MiXeD CamelCaseWord snake_case_word kebab-case-word e-mail@example.com",
    "東京は日本の首都です。 Café au lait, s'il vous plaît.",
    "internationalization antidisestablishmentarianism pneumonoultramicroscopic supercalifragilistic",
    "",
    "   ",
    "a",
]


def _raw(tok):
    """The shipped MiniLM tokenizer.json pads to 128 and truncates: compare with the raw ids."""
    tok.no_padding()
    tok.no_truncation()
    return tok


def _long_text(n_words: int) -> str:
    rng = np.random.default_rng(0)
    words = ["market", "shares", "government's", "election,", "football", "film.", "software", "(CEO)", "2024", "the"]
    return " ".join(rng.choice(words, n_words))


@pytest.mark.parametrize("max_tokens", [256, 7])
def test_word_cache_ids_equal_tokenizer_ids(max_tokens):
    tok = minilm_tokenizer()
    clf = StaticClassifier(np.zeros((tok.get_vocab_size(), 4), np.float32), tok, LABELS, max_tokens=max_tokens)
    ref = _raw(minilm_tokenizer())
    texts = PROSE + [_long_text(400), _long_text(40)]
    for _ in range(2):  # second pass is answered from the word cache
        for t in texts:
            want = ref.encode(t, add_special_tokens=False).ids[:max_tokens]
            assert clf._ids([t])[0] == want, t[:60]
    assert clf._ids(texts) == [ref.encode(t, add_special_tokens=False).ids[:max_tokens] for t in texts]


@pytest.mark.parametrize("text", [
    "internationalization " * 40,  # long words: far fewer than 6 chars per token
    "a" + " " * 30 + "b" + " " * 30 + "c " * 200,  # whitespace-heavy (tables, layout)
    "https://example.com/some/very/long/path?query=value&other=thing " * 10,
])
def test_word_cache_ids_equal_tokenizer_ids_on_unusual_text(text):
    tok = minilm_tokenizer()
    clf = StaticClassifier(np.zeros((tok.get_vocab_size(), 4), np.float32), tok, LABELS, max_tokens=64)
    assert clf._ids([text])[0] == _raw(minilm_tokenizer()).encode(text, add_special_tokens=False).ids[:64]


def test_word_cache_with_a_byte_level_bpe_tokenizer():
    """Byte-level BPE marks a word's leading space in the token ('Ġcat'), so per-word caching must not
    change the ids."""
    from tokenizers import Tokenizer

    def bpe():
        return Tokenizer.from_str(smollm2_tokenizer().backend_tokenizer.to_str())

    tok = bpe()
    clf = StaticClassifier(np.zeros((tok.get_vocab_size(), 4), np.float32), tok, LABELS, max_tokens=64)
    for t in PROSE[:3] + [_long_text(100)]:
        assert clf._ids([t])[0] == _raw(bpe()).encode(t, add_special_tokens=False).ids[:64], t[:60]


def test_temperature_scaling_changes_confidence_not_predictions(tmp_path):
    tr_x, tr_p, _ = make_data(90, seed=11)
    te_x, _, _ = make_data(30, seed=12)
    clf = make_ngram_clf().fit(tr_x, tr_p)
    before_pred, before_conf = clf.predict(te_x), clf.predict_proba(te_x).max(1)
    clf.scale_logits(0.5)
    assert clf.predict(te_x) == before_pred
    assert np.all(clf.predict_proba(te_x).max(1) >= before_conf - 1e-6) and clf.temperature == 0.5
    clf.save_pretrained(tmp_path / "t")
    back = StaticClassifier.from_pretrained(tmp_path / "t")
    np.testing.assert_allclose(back.predict_proba(te_x), clf.predict_proba(te_x), atol=1e-6)

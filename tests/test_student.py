"""StaticClassifier on a small random embedding table: learning, persistence, early stopping, tokenizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protege.losses import distillation_loss
from protege.students.classifier import StaticClassifier
from tiny import minilm_tokenizer, smollm2_tokenizer, wordlevel_tokenizer

LABELS = ["red", "green", "blue"]
CUES = {"red": ["cherry", "tomato", "ruby", "brick"], "green": ["grass", "lime", "leaf", "moss"],
        "blue": ["ocean", "sky", "sapphire", "denim"]}
FILLER = [f"w{i}" for i in range(40)]
VOCAB = [w for ws in CUES.values() for w in ws] + FILLER


@pytest.fixture(autouse=True, scope="module")
def _few_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def test_fit_separable_data_reaches_high_accuracy():
    tr_x, tr_p, _ = make_data(150, seed=0)
    te_x, _, te_y = make_data(90, seed=1)
    clf = make_clf()
    before = np.mean([LABELS.index(p) == y for p, y in zip(clf.predict(te_x), te_y)])
    clf.fit(tr_x, tr_p, epochs=150, lr=0.05, seed=0)
    acc = np.mean([LABELS.index(p) == y for p, y in zip(clf.predict(te_x), te_y)])
    assert acc >= 0.95, (before, acc)
    proba = clf.predict_proba(te_x)
    assert proba.shape == (90, 3) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert clf.n_params == clf.table.size + 16 * 3 + 3
    assert len(clf.history) == 150 and clf.history[-1]["loss"] < clf.history[0]["loss"]


@pytest.mark.parametrize("alpha,temperature", [(0.0, 1.0), (1.0, 1.0), (1.0, 4.0), (0.3, 2.0)])
def test_alpha_temperature_variants_learn(alpha, temperature):
    tr_x, tr_p, tr_y = make_data(120, seed=2)
    te_x, _, te_y = make_data(60, seed=3)
    clf = make_clf(seed=1).fit(tr_x, tr_p, hard_labels=tr_y, alpha=alpha, temperature=temperature, epochs=120,
                               lr=0.05, class_weights=np.ones(3, dtype=np.float32),
                               sample_weight=np.linspace(0.5, 1.5, 120).astype(np.float32))
    acc = np.mean([LABELS.index(p) == y for p, y in zip(clf.predict(te_x), te_y)])
    assert acc >= 0.9
    assert all(np.isfinite(h["loss"]) for h in clf.history)


def test_soft_labels_shape_the_confidence():
    """Pure KD (alpha=1) on flat teacher targets stays unsure; hard-label training gets confident."""
    tr_x, tr_p, tr_y = make_data(120, seed=4)
    flat = np.full_like(tr_p, 0.2)
    flat[np.arange(len(tr_y)), tr_y] = 0.6
    soft = make_clf().fit(tr_x, flat, alpha=1.0, temperature=1.0, epochs=300, lr=0.05)
    hard = make_clf().fit(tr_x, flat, alpha=0.0, epochs=300, lr=0.05)
    s, h = soft.predict_proba(tr_x).max(1).mean(), hard.predict_proba(tr_x).max(1).mean()
    assert 0.5 < s < 0.72, s  # calibrated to the teacher's 0.6
    assert h > s + 0.1, (s, h)


def test_save_and_load_give_identical_predictions(tmp_path):
    tr_x, tr_p, _ = make_data(60, seed=5)
    clf = make_clf().fit(tr_x, tr_p, epochs=40, lr=0.05)
    clf.save_pretrained(tmp_path / "s")
    assert {p.name for p in (tmp_path / "s").iterdir()} >= {"model.safetensors", "tokenizer.json", "config.json"}
    back = StaticClassifier.from_pretrained(tmp_path / "s")
    te_x, _, _ = make_data(30, seed=6)
    te_x.append("unknown words only zzz")
    te_x.append("")
    np.testing.assert_array_equal(back.predict_proba(te_x), clf.predict_proba(te_x))
    assert back.labels == LABELS and back.max_tokens == clf.max_tokens
    np.testing.assert_array_equal(back.idf, clf.idf)


def test_from_pretrained_on_a_wrong_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a protege student folder"):
        StaticClassifier.from_pretrained(tmp_path)


def test_dev_early_stopping_keeps_the_best_epoch():
    tr_x, tr_p, tr_y = make_data(90, seed=7)
    # a dev set whose teacher disagrees with the cue 40% of the time: agreement plateaus while the
    # model grows confident, so dev loss turns upward and patience stops training past the best epoch
    dv_x, dv_p, _ = make_data(60, seed=8, noise=0.4)
    clf = make_clf().fit(tr_x, tr_p, hard_labels=tr_y, dev=(dv_x, dv_p), epochs=400, lr=0.1, patience=15,
                         alpha=0.5, temperature=2.0)
    hist = clf.history
    assert len(hist) < 400, "early stopping never triggered"
    best = max(hist, key=lambda h: (h["dev_agreement"], -h["dev_loss"]))
    assert hist[-1]["epoch"] == best["epoch"] + 15  # stopped exactly `patience` epochs after the best
    assert hist[-1]["dev_loss"] != pytest.approx(best["dev_loss"], abs=1e-6)
    # the kept head is the best epoch's, not the last one's
    dl = torch.tensor(clf.decision_function(dv_x))
    agree = float((dl.argmax(1) == torch.tensor(dv_p).argmax(1)).float().mean())
    dloss = float(distillation_loss(dl, torch.tensor(dv_p), alpha=0.5, temperature=2.0))
    assert agree == pytest.approx(best["dev_agreement"])
    assert dloss == pytest.approx(best["dev_loss"], abs=1e-4)


def test_fit_is_deterministic_given_seed():
    tr_x, tr_p, _ = make_data(60, seed=9)
    a = make_clf().fit(tr_x, tr_p, epochs=30, seed=3)
    b = make_clf().fit(tr_x, tr_p, epochs=30, seed=3)
    np.testing.assert_array_equal(a.W, b.W)


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

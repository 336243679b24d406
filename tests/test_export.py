"""``protege export``: every format written, loaded back by the runtime that will use it, and compared.

- ONNX: the static student's graph and the encoder student's (``torch.onnx.export(dynamo=True)``) run in
  onnxruntime, fp32 and int8, against the original on the task's gold texts.
- GGUF / Ollama: a tiny random Llama with a real SentencePiece tokenizer (trained here, 300 pieces) and a
  ChatML template, converted by llama.cpp's own converter (from the llama-cpp-python sdist), loaded back
  with transformers ``gguf_file=`` and compared token for token; the Modelfile's template, filled the way
  Ollama fills it, must equal the HF chat template's rendering.
"""

from __future__ import annotations

import io
import json
import shutil
import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from protege.export import export
from protege.export.jsonl import check_chat_jsonl
from protege.task import load_task
from tiny import minilm_tokenizer, minilm_tokenizer_path, synthetic_rows, write_task

LABELS = ["red", "green", "blue"]
CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: extra threads only spin


def _run_folder(root: Path, student, *, threshold: float = 0.7) -> Path:
    run = root / "run"
    student.save_pretrained(run / "train" / "student")
    (run / "curate").mkdir(parents=True, exist_ok=True)
    rows = [{**r, "source": "teacher", "weight": 1.0} for r in synthetic_rows(40)]
    (run / "curate" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "report.json").write_text(json.dumps({
        "task": "tiny-colors", "kind": "classify", "metric": "accuracy", "n_eval": 15, "retained": 1.0,
        "student": {"score": 0.8, "agreement": 0.9}, "teacher": {"score": 0.8},
        "cascade": {"threshold": threshold, "coverage": 0.7, "curve": [[0, 1]]}}))
    return run


@pytest.fixture(scope="module")
def static_run(tmp_path_factory):
    from protege.students.classifier import StaticClassifier

    root = tmp_path_factory.mktemp("export")
    task = load_task(write_task(root / "task"))
    tok = minilm_tokenizer()
    from protege.students.ngrams import NgramFeatures

    st = StaticClassifier(np.random.default_rng(0).normal(size=(tok.get_vocab_size(), 16)).astype(np.float32), tok, LABELS,
                          ngrams=NgramFeatures(2, min_df=1))
    rows = synthetic_rows(60)
    st.fit([r["text"] for r in rows], np.eye(3, dtype=np.float32)[[LABELS.index(r["label"]) for r in rows]], dense_weight=1.0)
    return {"task": task, "run": _run_folder(root, st), "student": st, "root": root}


# -- ONNX --------------------------------------------------------------------------------------------

def test_static_student_to_onnx_parity_and_onnxruntime_load_back(static_run):
    import onnxruntime as ort

    from protege.data import load_gold
    from protege.export.onnx import flatten_ids, ngram_inputs

    task, st = static_run["task"], static_run["student"]
    r = export(static_run["run"], "onnx", task=task)
    out = Path(r["path"])
    assert r["parity"]["source"] == "gold" and r["parity"]["texts"] == len(load_gold(task))
    assert r["parity"]["fp32"]["agreement"] == 1.0 and r["parity"]["fp32"]["max_abs_prob_diff"] < 1e-5
    assert r["parity"]["int8"]["agreement"] >= 0.99 and r["parity"]["int8"]["ok"]
    assert r["sizes_bytes"]["model.int8.onnx"] < 0.5 * r["sizes_bytes"]["model.onnx"]
    for k in ("original", "onnx_fp32", "onnx_int8"):
        assert r["speed"][k]["single_ms_p50"] > 0
    # plain onnxruntime, no protege wrapper: token ids + offsets and TF-IDF n-gram rows in, probabilities out
    # (empty texts too); the n-gram block must matter, or this would not test it
    assert len(st.ngrams) > 0 and np.abs(st.V).max() > 0.1
    texts = ["the shiny cherry thing", "", "grass and lime and moss " * 40, "ocean", ""]
    ids = [st.tokenizer.encode(t, add_special_tokens=False).ids[: st.max_tokens] for t in texts]
    flat, offsets = flatten_ids(ids)
    feeds = {"input_ids": flat, "offsets": offsets, **ngram_inputs(st.ngrams.transform(texts))}
    assert (out / "ngrams.json").is_file()
    for name, tol in (("model.onnx", 1e-5), ("model.int8.onnx", 0.05)):
        sess = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        probs = sess.run(["probabilities"], feeds)[0]
        assert probs.shape == (len(texts), 3)
        assert np.abs(probs - st.predict_proba(texts)).max() < tol
    meta = json.loads((out / "protege.json").read_text())
    assert meta["labels"] == LABELS and meta["threshold"] == 0.7 and meta["task"] == "tiny-colors"
    assert "curve" not in meta["cascade"] and meta["parity"]["int8"]["ok"]


def test_parity_check_can_fail():
    from protege.export.onnx import parity

    ref = np.array([[0.9, 0.1], [0.2, 0.8]] * 50)
    assert parity(ref, ref)["ok"]
    worse = ref.copy()
    worse[0] = [0.1, 0.9]
    p = parity(ref, worse)
    assert p["agreement"] == pytest.approx(0.99) and p["ok"]
    worse[2] = [0.1, 0.9]
    assert not parity(ref, worse)["ok"]


def test_encoder_student_to_onnx_with_dynamo(static_run, tmp_path):
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from protege.export.onnx import OnnxClassifier
    from protege.students.encoder import EncoderClassifier

    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_path().parent, local_files_only=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=3, id2label=dict(enumerate(LABELS)),
                     label2id={lab: i for i, lab in enumerate(LABELS)})
    enc = EncoderClassifier(BertForSequenceClassification(cfg).eval(), tok, LABELS, max_length=64, inference="torch")
    run = _run_folder(tmp_path, enc)
    texts = [r["text"] for r in synthetic_rows(24, start=300)] + ["a much longer input " * 30]
    r = export(run, "onnx", texts=texts)
    assert r["student"] == "encoder" and r["parity"]["source"] == "given texts"
    assert r["parity"]["fp32"]["agreement"] == 1.0 and r["parity"]["fp32"]["max_abs_prob_diff"] < 1e-4
    assert r["parity"]["int8"]["agreement"] >= 0.99
    back = OnnxClassifier(r["path"], quantized=False)  # padded batches of mixed lengths
    assert np.abs(back.predict_proba(texts) - enc.predict_proba(texts)).max() < 1e-4


def test_onnx_refuses_a_causal_lm_and_gguf_refuses_a_classifier(static_run, tmp_path):
    with pytest.raises(ValueError, match="causal-LM"):
        export(static_run["run"], "gguf", out=tmp_path / "g")
    with pytest.raises(ValueError, match="unknown export format"):
        export(static_run["run"], "tflite")
    assert not (tmp_path / "g").exists()


# -- hf and jsonl -----------------------------------------------------------------------------------

def test_hf_export_via_the_cli_from_a_run_folder(static_run, tmp_path):
    from protege.cli import app
    from protege.students import load_student

    dest = tmp_path / "hf"
    cache = static_run["run"] / "train" / "student" / "ct2-float32"  # a runtime's derived copy: not exported
    cache.mkdir(exist_ok=True)
    (cache / "model.bin").write_bytes(b"x" * 100)
    r = CliRunner().invoke(app, ["export", str(static_run["run"]), "--format", "hf", "--out", str(dest)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert {"model.safetensors", "tokenizer.json", "config.json", "protege.json", "README.md"} <= {p.name for p in dest.iterdir()}
    assert not (dest / "ct2-float32").exists()
    shutil.rmtree(cache)  # the run folder is shared with the module's other tests
    meta = json.loads((dest / "protege.json").read_text())
    assert meta["labels"] == LABELS and meta["threshold"] == 0.7 and meta["scores"]["student"] == 0.8
    back = load_student(dest)
    texts = ["the plain sky thing", "the old ruby thing"]
    assert np.allclose(back.predict_proba(texts), static_run["student"].predict_proba(texts))
    assert not list(tmp_path.glob(".hf.tmp-*"))


def test_jsonl_is_openai_chat_finetuning_format(static_run):
    task = static_run["task"]
    r = export(static_run["run"], "jsonl", task=task)
    out = Path(r["path"])
    assert r["n_train"] + r["n_validation"] == 40 and r["n_validation"] >= 3
    lines = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert check_chat_jsonl(out / "train.jsonl") == r["n_train"] == len(lines)
    first = lines[0]["messages"]
    assert [m["role"] for m in first] == ["system", "user", "assistant"]
    assert first[0]["content"].startswith(task.instruction) and first[2]["content"] in LABELS
    rows = {x["text"]: x["label"] for x in synthetic_rows(40)}
    for ln in lines:
        assert rows[ln["messages"][1]["content"]] == ln["messages"][2]["content"]
    with pytest.raises(ValueError, match="--task"):
        export(static_run["run"], "jsonl")


# -- GGUF + Ollama --------------------------------------------------------------------------------

def tiny_spm_chat_lm(folder: Path):
    """A 2-layer random Llama with a 300-piece SentencePiece tokenizer and a ChatML template."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    words = ("the a cat dog red green blue ocean sky grass cherry tomato lime leaf small old shiny plain thing "
             "number say which colour text is about answer with one of").split()
    rng = random.Random(0)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(" ".join(rng.choice(words) for _ in range(12))
                                                          for _ in range(2000)),
                                   model_writer=buf, vocab_size=300, model_type="bpe", byte_fallback=True,
                                   user_defined_symbols=["<|im_start|>", "<|im_end|>"], unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2)
    (folder / "spm").mkdir(parents=True)
    (folder / "spm" / "tokenizer.model").write_bytes(buf.getvalue())
    tok = LlamaTokenizer.from_pretrained(folder / "spm", eos_token="<|im_end|>", add_bos_token=False)
    tok.chat_template = CHATML
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a large init, so that a wrong weight or token would change the answers
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    return model, tok


def test_gguf_and_ollama_export_load_back_and_answer_the_same(tmp_path):
    pytest.importorskip("sentencepiece", reason="llama.cpp's converter needs sentencepiece (pip install sentencepiece)")
    from protege.export.gguf import ConverterUnavailable, converter_dir, render_modelfile_template
    from protege.students.causal_lm import CausalLMStudent
    from protege.students.lm_tokens import render

    try:
        converter_dir()
    except ConverterUnavailable as e:  # no PyPI and no cached sdist: nothing to convert with
        pytest.skip(f"llama.cpp's converter could not be obtained from PyPI: {e}")
    model, tok = tiny_spm_chat_lm(tmp_path)
    student = CausalLMStudent(model, tok, system_prompt="Say which colour the text is about.\nAnswer with one of: "
                              "red, green, blue.", max_new_tokens=8)
    student.labels = LABELS
    run = _run_folder(tmp_path, student)
    texts = ["the red cherry", "green grass and lime", "the blue ocean sky", "a small old thing"]
    r = export(run, "ollama", outtype="f32", texts=texts)
    v = r["verification"]
    assert v["n"] == 4 and v["same_prompt_ids"] == 4 and v["same_answers"] == 4 and v["chat_template_in_gguf"]
    assert v["max_abs_logit_diff"] < 1e-4
    assert any(x["hf"] for x in v["examples"])  # the comparison saw real (non-empty) answers
    out = Path(r["path"])
    assert {"model.gguf", "Modelfile", "protege.json", "README.md"} <= {p.name for p in out.iterdir()}
    # loads back on its own, from the export folder alone
    from transformers import AutoModelForCausalLM

    g = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf")
    assert g.config.num_hidden_layers == 2 and g.config.vocab_size == len(tok)
    mf = (out / "Modelfile").read_text()
    assert "FROM ./model.gguf" in mf and 'PARAMETER stop "<|im_end|>"' in mf and "PARAMETER temperature 0" in mf
    assert f'SYSTEM """{student.system_prompt}"""' in mf
    filled = render_modelfile_template(mf, student.system_prompt, "the red cherry")
    assert filled == render(tok, student.messages("the red cherry"))
    meta = json.loads((out / "protege.json").read_text())
    assert meta["gguf"]["outtype"] == "f32" and meta["verification"]["agreement"] == 1.0

"""Classifier students to ONNX (fp32 + dynamic int8), checked against the original on the eval set.

- **static** student: its whole forward pass after tokenization — gather the token rows, IDF-weighted
  bag mean, L2 norm, linear head, plus the n-gram block's sparse logits, softmax — is written directly as
  an ONNX graph that takes the token ids of a batch flattened (``input_ids [N]``) and each text's start
  in it (``offsets [B]``), the EmbeddingBag calling convention; the TF-IDF n-gram rows come the same way
  (``ngram_ids``, ``ngram_weights``, ``ngram_offsets``). No torch at inference, same as the numpy student.
- **encoder** student: ``torch.onnx.export(..., dynamo=True)`` (exact on padded batches, where the legacy
  exporter is not) with dynamic batch and sequence axes.

Both are then quantized with ``onnxruntime.quantization.quantize_dynamic`` (int8 weights; the static
table is the bulk of the bytes). Tokenization stays outside the graph; :class:`OnnxClassifier` does it
with the exported ``tokenizer.json`` and runs the graph with onnxruntime.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Sequence

import numpy as np

from protege.data import write_json
from protege.artifacts import atomic_dir
from protege.export.common import metadata, model_card, student_dir, student_kind
from protege.students.classifier import LogitClassifier
from protege.timing import measure

OPSET = 18
MIN_AGREEMENT = 0.99


def _need_onnx() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"ONNX export needs {' and '.join(missing)}: pip install 'protege[onnx]'")


# -- the static student as a graph -----------------------------------------------------------------

def static_graph(student):
    """ONNX graph of :class:`StaticClassifier` from token ids on: ``(input_ids [N], offsets [B]) → logits, probabilities``.

    Per-text sums are differences of prefix sums (``CumSum`` in float64, so long batches lose no
    precision) read at each text's start and end: linear in the number of tokens, where ONNX's
    ``ScatterElements(reduction="add")`` is ~100x slower on CPU and a one-hot matmul is quadratic.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    f32, f64, i64 = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64
    table = np.ascontiguousarray(student.table, dtype=np.float32)
    D = table.shape[1]
    arrays = {"table": table, "idf": np.ascontiguousarray(student.idf, dtype=np.float32),
              "W": np.ascontiguousarray(student.W, dtype=np.float32), "b": np.ascontiguousarray(student.b, dtype=np.float32),
              "zero": np.array(0, dtype=np.int64), "axis0": np.array([0], dtype=np.int64),
              "axis1": np.array([1], dtype=np.int64), "start1": np.array([1], dtype=np.int64),
              "big": np.array([2**62], dtype=np.int64), "zrow": np.zeros((1, D), dtype=np.float64),
              "z1": np.zeros(1, dtype=np.float64), "eps_w": np.array(1e-6, dtype=np.float32),
              "eps_n": np.array(1e-9, dtype=np.float32)}
    inits = [numpy_helper.from_array(v, k) for k, v in arrays.items()]
    N = helper.make_node

    def segment_sums(x: str, offsets: str, n_items: str, zero_row: str, out: str) -> list:
        """Per-text sums of the rows of ``x`` (texts laid end to end, each starting at ``offsets``):
        prefix sums in float64 read at each text's end and start."""
        return [N("Shape", [n_items], [f"{out}_n"]),
                N("Slice", [offsets, "start1", "big", "axis0"], [f"{out}_next"]),
                N("Concat", [f"{out}_next", f"{out}_n"], [f"{out}_ends"], axis=0),  # a text ends where the next starts
                N("Cast", [x], [f"{x}64"], to=f64),
                N("CumSum", [f"{x}64", "zero"], [f"{out}_cs"]),
                N("Concat", [zero_row, f"{out}_cs"], [f"{out}_cs0"], axis=0),
                N("Gather", [f"{out}_cs0", f"{out}_ends"], [f"{out}_end"], axis=0),
                N("Gather", [f"{out}_cs0", offsets], [f"{out}_start"], axis=0),
                N("Sub", [f"{out}_end", f"{out}_start"], [f"{out}64"]),
                N("Cast", [f"{out}64"], [out], to=f32)]

    # IDF-weighted token rows and their weights, summed per text
    nodes = [N("Gather", ["table", "input_ids"], ["rows"], axis=0),
             *segment_sums("rows", "offsets", "input_ids", "zrow", "sums"),
             N("Gather", ["idf", "input_ids"], ["w"], axis=0),
             *segment_sums("w", "offsets", "input_ids", "z1", "wsum"),
             # mean by IDF mass, L2 normalise, linear head
             N("Max", ["wsum", "eps_w"], ["wsum_c"]),
             N("Unsqueeze", ["wsum_c", "axis1"], ["wsum_col"]),
             N("Div", ["sums", "wsum_col"], ["mean"]),
             N("Mul", ["mean", "mean"], ["sq"]),
             N("ReduceSum", ["sq", "axis1"], ["ss"], keepdims=1),
             N("Sqrt", ["ss"], ["norm"]),
             N("Max", ["norm", "eps_n"], ["norm_c"]),
             N("Div", ["mean", "norm_c"], ["x"]),
             N("MatMul", ["x", "W"], ["xw"]),
             N("Add", ["xw", "b"], ["dense_logits"]),
    ]
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["n_tokens"]),
              helper.make_tensor_value_info("offsets", i64, ["batch"])]
    L = len(student.labels)
    if student.ngrams is not None:
        # sparse n-gram logits: Σ_j tfidf_j · V[gram_j] per text, by the same prefix-sum trick
        inits.append(numpy_helper.from_array(np.ascontiguousarray(student.V, dtype=np.float32), "V"))
        inits.append(numpy_helper.from_array(np.zeros((1, L), dtype=np.float64), "zrowL"))
        nodes += [
            N("Gather", ["V", "ngram_ids"], ["vrows"], axis=0),
            N("Unsqueeze", ["ngram_weights", "axis1"], ["gw"]),
            N("Mul", ["vrows", "gw"], ["vw"]),
            *segment_sums("vw", "ngram_offsets", "ngram_ids", "zrowL", "ngram_logits"),
            N("Add", ["dense_logits", "ngram_logits"], ["logits"]),
        ]
        inputs += [helper.make_tensor_value_info("ngram_ids", i64, ["n_grams"]),
                   helper.make_tensor_value_info("ngram_weights", f32, ["n_grams"]),
                   helper.make_tensor_value_info("ngram_offsets", i64, ["batch"])]
    else:
        nodes.append(N("Identity", ["dense_logits"], ["logits"]))
    nodes.append(N("Softmax", ["logits"], ["probabilities"], axis=-1))
    graph = helper.make_graph(
        nodes, "protege_static_classifier", inputs,
        [helper.make_tensor_value_info("logits", f32, ["batch", L]),
         helper.make_tensor_value_info("probabilities", f32, ["batch", L])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="protege")
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def ngram_inputs(X) -> dict:
    """The n-gram block's feeds from a CSR TF-IDF matrix: column ids, weights, each row's start."""
    return {"ngram_ids": X.indices.astype(np.int64), "ngram_weights": X.data.astype(np.float32),
            "ngram_offsets": X.indptr[:-1].astype(np.int64)}


def flatten_ids(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.cumsum([0] + [len(x) for x in ids[:-1]], dtype=np.int64)
    flat = np.fromiter((i for x in ids for i in x), dtype=np.int64, count=sum(len(x) for x in ids))
    return flat, offsets


# -- the encoder student through torch.export ---------------------------------------------------

def export_encoder_graph(student, path: Path) -> None:
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            logits = self.m(input_ids=input_ids, attention_mask=attention_mask).logits
            return logits, torch.softmax(logits, -1)

    enc = student.tokenizer(["a short example", "and a somewhat longer second example text"], padding=True,
                            return_tensors="pt")
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    model = Logits(student.model.eval()).eval()
    import logging
    import warnings

    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed", axis-renaming notes: not actionable here
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, (enc["input_ids"], enc["attention_mask"]), dynamo=True,
                                 input_names=["input_ids", "attention_mask"], output_names=["logits", "probabilities"],
                                 dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                                 opset_version=OPSET, verbose=False)
    quiet.setLevel(level)
    prog.save(str(path), external_data=False)


# -- running an export --------------------------------------------------------------------------

class OnnxClassifier(LogitClassifier):
    """``predict / predict_proba`` over an exported folder, with onnxruntime (no torch)."""

    def __init__(self, folder: str | Path, quantized: bool = True, threads: int = 1):
        import onnxruntime as ort

        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "protege.json").read_text(encoding="utf-8"))
        self.labels = list(self.meta["labels"])
        self.kind = self.meta["student"]
        name = "model.int8.onnx" if quantized and (self.folder / "model.int8.onnx").is_file() else "model.onnx"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.folder / name), opts, providers=["CPUExecutionProvider"])
        self.model_file = name
        if self.kind == "static":
            from tokenizers import Tokenizer

            from protege.students.words import WordTable, tokenizes_per_word

            self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
            self.tokenizer.no_padding()
            self.tokenizer.no_truncation()
            self.max_tokens = int(self.meta.get("max_tokens", 256))
            self._word_cache = WordTable(self.tokenizer)
            self._per_word = tokenizes_per_word(self.tokenizer)
            self.ngrams = None
            if (self.folder / "ngrams.json").is_file():
                from protege.students.ngrams import NgramFeatures

                self.ngrams = NgramFeatures.load(self.folder / "ngrams.json")
        else:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
            self.max_length = int(self.meta.get("max_length", 128))

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kw) -> "OnnxClassifier":
        return cls(folder, **kw)

    def decision_function(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        if self.kind == "static":
            from protege.students.classifier import StaticClassifier

            # the student's own tokenization (word table, truncation, n-gram rows): same inputs by construction
            flat, ptr, ng = StaticClassifier._token_ids(self, texts)
            feeds = {"input_ids": flat, "offsets": ptr[:-1]}
            if self.ngrams is not None:
                feeds.update(ngram_inputs(ng if ng is not None else self.ngrams.transform(texts)))
            return self.session.run(["logits"], feeds)[0]
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        for i in range(0, len(texts), batch_size):
            idx = order[i : i + batch_size]
            enc = self.tokenizer([texts[j] for j in idx], truncation=True, max_length=self.max_length, padding=True,
                                 return_tensors="np")
            out[idx] = self.session.run(["logits"], {"input_ids": enc["input_ids"].astype(np.int64),
                                                     "attention_mask": enc["attention_mask"].astype(np.int64)})[0]
        return out


def quantize(src: Path, dst: Path, per_channel: bool = False) -> None:
    """Dynamic int8: weights of MatMul / Gather stored as int8, activations quantized on the fly. ``per_channel``:
    one scale per output column instead of per matrix (a fine-tuned MiniLM's int8 argmax agreed with torch on
    98% of tweets instead of 96%, same speed: bench/encoder_int8.py)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "consider pre-processing": shape inference adds nothing to these graphs
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gather"],
                        per_channel=per_channel)
    finally:
        root.setLevel(level)


# -- checks --------------------------------------------------------------------------------------

def parity(ref_proba: np.ndarray, proba: np.ndarray) -> dict:
    agree = float((ref_proba.argmax(1) == proba.argmax(1)).mean()) if len(proba) else float("nan")
    return {"agreement": agree, "max_abs_prob_diff": float(np.abs(ref_proba - proba).max()) if len(proba) else 0.0,
            "ok": bool(agree >= MIN_AGREEMENT)}


def timing(fn, texts: Sequence[str], n_single: int = 100, repeats: int = 3) -> dict:
    single, batched = measure(fn, texts, n_single=n_single, repeats=repeats)
    return {"single_ms_p50": statistics.median(single) * 1000, "batched_ms_per_item": batched * 1000}


def eval_texts(run: Path, task=None, limit: int = 2000) -> tuple[list[str], str]:
    """The task's gold inputs (the eval set); without the task file, the run's curated training inputs."""
    if task is not None:
        from protege.data import load_gold

        return [g["text"] for g in load_gold(task)][:limit], "gold"
    from protege.data import read_jsonl

    p = Path(run) / "curate" / "train.jsonl"
    if p.is_file():
        return [r["text"] for r in read_jsonl(p)][:limit], "curated training inputs"
    raise ValueError("no texts to check ONNX parity on: pass --task (gold set) or keep the run's curate/ folder")


def export_onnx(run: Path, dest: Path, task=None, *, texts: Sequence[str] | None = None, threads: int = 1) -> dict:
    _need_onnx()
    import onnx

    from protege.students import load_student

    src = student_dir(run)
    kind = student_kind(src)
    if kind not in ("static", "encoder"):
        raise ValueError(f"ONNX export is for classifier students (static, encoder); this run's student is {kind!r}: "
                         f"use --format gguf / ollama for a causal LM")
    student = load_student(src)
    if kind == "encoder":  # the reference is the torch model, not the int8 graph the folder also carries
        student = type(student).from_pretrained(src, inference="torch")
    if texts is None:
        texts, source = eval_texts(run, task)
    else:
        texts, source = list(texts), "given texts"
    if not texts:
        raise ValueError("no texts to check parity on")
    meta = metadata(run, task)
    with atomic_dir(dest) as tmp:
        if kind == "static":
            onnx.save(static_graph(student), str(tmp / "model.onnx"))
            student.tokenizer.save(str(tmp / "tokenizer.json"))
            meta["max_tokens"] = student.max_tokens
            meta["inputs"] = {"input_ids": "int64 [n_tokens]: token ids of the batch, concatenated (tokenizer.json, "
                              "no special tokens, first max_tokens per text)",
                              "offsets": "int64 [batch]: where each text starts in input_ids"}
            if student.ngrams is not None:
                student.ngrams.save(tmp / "ngrams.json")
                meta["inputs"].update({
                    "ngram_ids": "int64 [n_grams]: columns of the texts' TF-IDF n-gram rows (ngrams.json), concatenated",
                    "ngram_weights": "float32 [n_grams]: their TF-IDF weights (sublinear tf · idf, L2-normalised per text)",
                    "ngram_offsets": "int64 [batch]: where each text starts in ngram_ids"})
        else:
            export_encoder_graph(student, tmp / "model.onnx")
            student.tokenizer.save_pretrained(tmp)
            meta["max_length"] = student.max_length
            meta["inputs"] = {"input_ids": "int64 [batch, sequence]", "attention_mask": "int64 [batch, sequence]"}
        quantize(tmp / "model.onnx", tmp / "model.int8.onnx")
        write_json(tmp / "protege.json", meta)
        ref = student.predict_proba(texts)
        fp32 = OnnxClassifier(tmp, quantized=False, threads=threads)
        int8 = OnnxClassifier(tmp, quantized=True, threads=threads)
        checks = {"texts": len(texts), "source": source, "fp32": parity(ref, fp32.predict_proba(texts)),
                  "int8": parity(ref, int8.predict_proba(texts))}
        speed = {"original": timing(student.predict_proba, texts), "onnx_fp32": timing(fp32.predict_proba, texts),
                 "onnx_int8": timing(int8.predict_proba, texts)}
        for k in ("onnx_fp32", "onnx_int8"):
            speed[k]["speedup_single"] = speed["original"]["single_ms_p50"] / speed[k]["single_ms_p50"]
            speed[k]["speedup_batched"] = speed["original"]["batched_ms_per_item"] / speed[k]["batched_ms_per_item"]
        sizes = {n: (tmp / n).stat().st_size for n in ("model.onnx", "model.int8.onnx")}
        meta.update(parity=checks, speed=speed, sizes_bytes=sizes, original="numpy" if kind == "static" else "pytorch",
                    recommended="model.int8.onnx" if checks["int8"]["ok"] else "model.onnx")
        write_json(tmp / "protege.json", meta)
        (tmp / "README.md").write_text(model_card(meta, _usage(kind)), encoding="utf-8")
        if not checks["fp32"]["ok"]:
            raise ValueError(f"ONNX fp32 export agrees with the student on only {checks['fp32']['agreement']:.2%} of "
                             f"{len(texts)} {source} (need {MIN_AGREEMENT:.0%}); not written")
    return {"format": "onnx", "path": str(dest), "student": kind, "parity": checks, "speed": speed, "sizes_bytes": sizes,
            "recommended": meta["recommended"]}


def _usage(kind: str) -> str:
    if kind == "static":
        return ("Run: `protege.export.onnx.OnnxClassifier(folder).predict_proba(texts)`, or feed onnxruntime "
                "`input_ids` (all texts' token ids concatenated) and `offsets` (start of each text).")
    return "Run: `protege.export.onnx.OnnxClassifier(folder).predict_proba(texts)` (input_ids + attention_mask)."


__all__ = ["OnnxClassifier", "export_onnx", "static_graph", "flatten_ids"]

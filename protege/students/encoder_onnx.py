"""The fine-tuned encoder student's int8 ONNX Runtime inference: what makes the ``encoder`` rung fast enough to ship.

In torch, one item through a fine-tuned all-MiniLM-L6-v2 costs ~7-15 ms on one core, over the ladder's default
``student.max_ms`` (5 ms). The same network exported with ``torch.onnx.export(dynamo=True)``
(:func:`protege.export.onnx.export_encoder_graph`: logits, dynamic batch and sequence axes) and quantized with
``quantize_dynamic`` (int8 MatMul / Gather weights, one scale per output channel:
:func:`protege.export.onnx.quantize`) runs in ~2-4 ms, and agrees with torch on the argmax of ~98% of items
(``bench/encoder_int8.py`` measures both; per-matrix scales agreed on 96%).

The export lives in the student folder as ``model.int8.onnx`` beside ``tokenizer.json``; it is run by
:class:`protege.students.frozen.OnnxEncoder` (the same tokenise, sort-by-length, pad loop the frozen rung uses)
pointed at the ``logits`` output.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
import time
from pathlib import Path

ONNX_FILE = "model.int8.onnx"
INFERENCE = ("onnx-int8", "torch")

log = logging.getLogger(__name__)


def ort_available() -> bool:
    """onnx, onnxruntime and onnxscript (the dynamo exporter's) importable: the int8 path can be built and run."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "onnxscript"))


def check_inference(inference: str) -> str:
    if inference not in INFERENCE:
        raise ValueError(f"encoder inference must be one of {', '.join(INFERENCE)}, not {inference!r}")
    return inference


def export_int8(model, tokenizer, dest: Path) -> float:
    """``dest/model.int8.onnx`` + ``dest/tokenizer.json`` for a sequence-classification model; returns seconds taken.

    The fp32 graph is an intermediate in a temp dir (only the int8 one is kept: it is the one that runs)."""
    from types import SimpleNamespace

    from protege.export.onnx import export_encoder_graph, quantize

    t0 = time.perf_counter()
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="protege-encoder-onnx-"))
    try:
        export_encoder_graph(SimpleNamespace(model=model, tokenizer=tokenizer), tmp / "model.onnx")
        quantize(tmp / "model.onnx", tmp / ONNX_FILE, per_channel=True)
        shutil.move(str(tmp / ONNX_FILE), str(dest / ONNX_FILE))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.backend_tokenizer.save(str(dest / "tokenizer.json"))
    return time.perf_counter() - t0


def session(folder: Path, max_length: int, threads: int = 1):
    """An ORT runner of ``folder/model.int8.onnx``: ``.encode(texts) -> logits [n, n_labels]``."""
    from protege.students.frozen import OnnxEncoder

    return OnnxEncoder(folder, max_length, threads, file=ONNX_FILE, output="logits")


def has_export(folder: Path) -> bool:
    return (Path(folder) / ONNX_FILE).is_file() and (Path(folder) / "tokenizer.json").is_file()

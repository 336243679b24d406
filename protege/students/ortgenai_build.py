"""The ONNX Runtime GenAI copy of a causal-LM student folder: whether it can be built, where it lives, building it.

The student folder stays a plain HF model (the reference). Its ONNX copy is built on first use by
onnxruntime-genai's own model builder (``python -m onnxruntime_genai.models.builder``, offline: it reads the
folder's safetensors and tokenizer) and cached beside it as ``<student>/ortgenai-<fp32|int8|int4>/``, written to
a temporary folder and renamed, so a killed conversion never leaves a folder that looks whole. ``int8_verified``
uses two of them, ``ortgenai-fp32`` and ``ortgenai-int8``. Decoding is :mod:`protege.students.ortgenai_lm`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

PRECISIONS = {"float32": "fp32", "int8": "int8", "int8_float32": "int8", "int4": "int4", "int8_verified": "fp32"}

def ortgenai_available() -> bool:
    return importlib.util.find_spec("onnxruntime_genai") is not None


# decoder-only architectures onnxruntime-genai's builder exports (a subset of its list: the families protege's
# causal-LM students come from)
ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
                 "GemmaForCausalLM", "Gemma2ForCausalLM", "GraniteForCausalLM", "OlmoForCausalLM"}


def ortgenai_problem(student_dir: str | Path) -> str | None:
    """Why onnxruntime-genai cannot run this saved model folder, or None. Its CPU attention kernel
    (GroupQueryAttention) needs a head size that is a multiple of 16."""
    try:
        cfg = json.loads((Path(student_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{student_dir} has no readable config.json"
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        return f"architecture {arch} is not one onnxruntime-genai's builder exports here"
    head = cfg.get("head_dim") or cfg.get("hidden_size", 0) // max(1, cfg.get("num_attention_heads", 1))
    if head % 16:
        return f"head size {head} is not a multiple of 16 (onnxruntime-genai's CPU attention kernel)"
    return None


def ortgenai_folder(student_dir: str | Path, compute_type: str) -> Path:
    return Path(student_dir) / f"ortgenai-{PRECISIONS[compute_type]}"


def convert(student_dir: str | Path, compute_type: str = "float32") -> Path:
    """The ONNX Runtime GenAI copy of a saved HF causal-LM folder, built once (offline) and cached beside it."""
    if compute_type not in PRECISIONS:
        raise ValueError(f"student.compute_type {compute_type!r}: onnxruntime-genai takes one of {sorted(PRECISIONS)}")
    if compute_type == "int8_verified":  # the drafter, then the float32 copy whose answers are given
        convert(student_dir, "int8")
    return build(student_dir, ortgenai_folder(student_dir, compute_type), PRECISIONS[compute_type])


def build(student_dir: str | Path, dest: Path, precision: str, extra_options: Sequence[str] = ()) -> Path:
    """``dest``: the builder's export of ``student_dir`` at ``precision`` (``fp32`` / ``int8`` / ``int4``, with
    the builder's ``--extra_options key=value ...``), unless already there; written to a temporary folder beside
    the student and renamed, so a killed conversion never leaves a folder that looks whole."""
    if (dest / "genai_config.json").is_file():
        return dest
    tmp = Path(tempfile.mkdtemp(prefix=".ortgenai-", dir=Path(student_dir)))
    try:
        # The logits of every appended position are needed to verify drafts: the LM head is not pruned.
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(Path(student_dir).resolve()),
               "-o", str(tmp / "m"), "-p", precision, "-e", "cpu", "-c", str(tmp / "cache")]
        cmd += ["--extra_options", *extra_options] if extra_options else []
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        if r.returncode != 0 or not (tmp / "m" / "genai_config.json").is_file():
            tail = (r.stderr or r.stdout or "").strip().splitlines()[-6:]
            raise RuntimeError(f"onnxruntime-genai could not convert {student_dir} ({precision} "
                               f"{' '.join(extra_options)}): " + " | ".join(tail))
        try:
            os.replace(tmp / "m", dest)
        except OSError:  # another process finished the same conversion first
            if not (dest / "genai_config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest

"""Stage 6: take the trained student (or the curated data) somewhere it can run without protege.

=========  ===================================================================================================
format     what is written under ``<run>/export/<format>/``
=========  ===================================================================================================
hf         the student folder as saved (safetensors, config, tokenizer) + ``protege.json`` (task, labels,
           cascade threshold, scores) and a short ``README.md`` model card
onnx       classifier students: ``model.onnx`` + dynamic int8 ``model.int8.onnx`` (onnxruntime), parity on
           the eval set and speed vs the original printed and kept in ``protege.json`` (:mod:`.onnx`)
gguf       causal-LM students: ``model.gguf`` from llama.cpp's own converter, loaded back with transformers
           and compared with the HF student on a sample (:mod:`.gguf`)
ollama     ``gguf`` + an Ollama ``Modelfile`` (template, system prompt, parameters)
jsonl      the curated training data as OpenAI chat fine-tuning JSONL (``train.jsonl`` + ``validation.jsonl``)
=========  ===================================================================================================

Every export is written into a temporary sibling folder and renamed into place when complete (a killed
export never leaves a folder that looks finished).
"""

from __future__ import annotations

from pathlib import Path

from protege.export.hf import export_hf
from protege.export.jsonl import export_jsonl

FORMATS = ("hf", "onnx", "gguf", "ollama", "jsonl")


# -- formats -----------------------------------------------------------------------------------


def export(run: Path, fmt: str, *, task=None, out: Path | None = None, **kw) -> dict:
    """Export a run in ``fmt`` (one of :data:`FORMATS`); returns a summary dict (also the CLI's table)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    run = Path(run).resolve()  # relative run / --out folders work whatever directory a tool runs in
    dest = Path(out).resolve() if out else run / "export" / fmt
    if fmt == "hf":
        return export_hf(run, dest, task)
    if fmt == "jsonl":
        return export_jsonl(run, dest, task)
    if fmt == "onnx":
        from protege.export.onnx import export_onnx

        return export_onnx(run, dest, task, **kw)
    from protege.export.gguf import export_gguf

    return export_gguf(run, dest, task, ollama=fmt == "ollama", **kw)



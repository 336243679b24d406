"""``--format hf``: the student as a Hugging Face ``save_pretrained`` folder plus a model card."""

from __future__ import annotations

import shutil
from pathlib import Path

from protege.artifacts import atomic_dir
from protege.data import write_json
from protege.export.common import metadata, model_card, student_dir


# folders a student's runtime derives from its weights on first use (CTranslate2 / ONNX Runtime GenAI copies of a
# causal LM, and their unfinished temp folders): caches, rebuilt wherever the folder is loaded, not the model
RUNTIME_CACHES = ("ct2-", "ortgenai-", ".")


def export_hf(run: Path, dest: Path, task=None) -> dict:
    src = student_dir(run)
    meta = metadata(run, task)
    with atomic_dir(dest) as tmp:
        for f in src.iterdir():
            if f.is_dir() and f.name.startswith(RUNTIME_CACHES):
                continue
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        write_json(tmp / "protege.json", meta)
        (tmp / "README.md").write_text(model_card(meta), encoding="utf-8")
    return {"format": "hf", "path": str(dest), "files": sorted(p.name for p in dest.iterdir()), "metadata": meta}

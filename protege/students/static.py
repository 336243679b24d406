"""Static token embeddings distilled from a sentence encoder (the model2vec recipe, done here).

Each vocabulary token is passed through the encoder on its own (``[CLS] tok [SEP]``), mean-pooled, and
the table is reduced with PCA. A sentence is then the mean of its tokens' rows: no attention, no
matmul chain — tens of microseconds per input on one core. We do it ourselves rather than through
``model2vec.distill`` because that extra pins an older transformers; inference needs nothing but numpy
and the tokenizer.

The table depends only on (encoder, dims), so it is built once and cached under
``$PROTEGE_CACHE`` (default ``~/.cache/protege``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from protege.artifacts import fingerprint
from protege.progress import bar
from protege.task import TaskError, resolve_model_path


def cache_dir() -> Path:
    return Path(os.environ.get("PROTEGE_CACHE", Path.home() / ".cache" / "protege"))


def distill_static(encoder: str, dims: int = 256, batch_size: int = 512) -> tuple[np.ndarray, Path]:
    """(embeddings [vocab, dims] float32, path to tokenizer.json); cached after the first call."""
    path = resolve_model_path(encoder)
    if not Path(path).is_dir():
        raise TaskError(f"student.embedder: {path!r} is not a local model folder")
    target = cache_dir() / "static" / fingerprint({"encoder": str(Path(path).resolve()), "dims": dims, "v": 1})
    if (target / "embeddings.npy").is_file() and (target / "tokenizer.json").is_file():
        return np.load(target / "embeddings.npy"), target / "tokenizer.json"

    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    n = len(tok)
    special = set(tok.all_special_ids)
    cls_id = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    sep_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    ids = np.arange(n)
    out = np.zeros((n, model.config.hidden_size), dtype=np.float32)
    with torch.no_grad(), bar("student: distil static embeddings", n) as advance:
        for i in range(0, n, batch_size):
            chunk = torch.tensor(ids[i : i + batch_size]).unsqueeze(1)
            parts = [chunk]
            if cls_id is not None:
                parts.insert(0, torch.full_like(chunk, cls_id))
            if sep_id is not None:
                parts.append(torch.full_like(chunk, sep_id))
            h = model(input_ids=torch.cat(parts, 1)).last_hidden_state.mean(1)
            out[i : i + len(chunk)] = h.numpy()
            advance(len(chunk))
    keep = np.array([i not in special for i in range(n)])
    from sklearn.decomposition import PCA

    dims = min(dims, out.shape[1])
    pca = PCA(n_components=dims, random_state=0).fit(out[keep])
    emb = pca.transform(out).astype(np.float32)
    emb[~keep] = 0.0
    tmp = Path(tempfile.mkdtemp(dir=_ensure(target.parent), prefix=".tmp-"))
    np.save(tmp / "embeddings.npy", emb)
    tok.backend_tokenizer.save(str(tmp / "tokenizer.json"))
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return emb, target / "tokenizer.json"


def _ensure(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p

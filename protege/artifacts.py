"""Stage artifact folders: ``<out>/<stage>/`` with the ``config.json`` that produced them.

A stage writes into a temporary sibling folder and renames it into place only when it is complete,
so a killed run never leaves a folder that looks finished. ``config.json`` carries a fingerprint of
the stage's settings and its inputs' fingerprints; a stage whose fingerprint is unchanged is skipped.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from protege import __version__
from protege.data import write_json


def fingerprint(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def read_config(stage_dir: Path) -> dict | None:
    p = Path(stage_dir) / "config.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def is_fresh(stage_dir: Path, fp: str) -> bool:
    cfg = read_config(stage_dir)
    return cfg is not None and cfg.get("fingerprint") == fp


def require(stage_dir: Path, what: str) -> dict:
    cfg = read_config(stage_dir)
    if cfg is None:
        raise FileNotFoundError(f"{stage_dir} has no finished artifact; run `protege {what}` first")
    return cfg


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a temp folder next to ``dest``; on success it replaces ``dest`` in one rename."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        yield tmp
        for f in [tmp, *tmp.rglob("*")]:  # mkdtemp / mkstemp make owner-only files: a model folder is shared
            f.chmod(0o755 if f.is_dir() else 0o644)
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{tmp.name[-8:]}")
            dest.rename(old)
        tmp.rename(dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def stage_writer(stage_dir: Path, config: dict) -> Iterator[Path]:
    """Yield a temp folder; on success write config.json into it and swap it in for ``stage_dir``."""
    with atomic_dir(stage_dir) as tmp:
        yield tmp
        write_json(tmp / "config.json", {**config, "protege_version": __version__})

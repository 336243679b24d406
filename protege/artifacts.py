"""Stage artifact folders: ``<out>/<stage>/`` with the ``config.json`` that produced them.

A stage writes into a temporary sibling folder and renames it into place only when it is complete,
so a killed run never leaves a folder that looks finished. ``config.json`` carries a fingerprint of
the stage's settings and its inputs' fingerprints; a stage whose fingerprint is unchanged is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
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


LEGACY_STALE_S = 86400.0  # a temp folder without an owner pid in its name (older protege) is stale after a day


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


def clean_stale(dest: Path) -> list[Path]:
    """Remove ``.<name>.tmp-*`` / ``.<name>.old-*`` folders next to ``dest`` left by a killed process.

    The folder names carry the owner's pid (``.<name>.tmp-<pid>-<random>``): stale once that process is
    gone. Names without a pid (made before pids were recorded) are stale after :data:`LEGACY_STALE_S`.
    """
    dest, removed = Path(dest), []
    if not dest.parent.is_dir():
        return removed
    now = time.time()
    for kind in ("tmp", "old"):
        for p in dest.parent.glob(f".{dest.name}.{kind}-*"):
            tag = p.name[len(f".{dest.name}.{kind}-"):]
            pid, sep, _ = tag.partition("-")
            try:
                stale = not _pid_alive(int(pid)) if sep and pid.isdigit() else now - p.stat().st_mtime > LEGACY_STALE_S
            except OSError:  # vanished meanwhile
                continue
            if stale:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a temp folder next to ``dest``; on success it replaces ``dest`` in one rename.

    Leftovers of a killed earlier attempt at the same ``dest`` are removed first (:func:`clean_stale`).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-{os.getpid()}-"))
    try:
        yield tmp
        for f in [tmp, *tmp.rglob("*")]:  # mkdtemp / mkstemp make owner-only files: a model folder is shared
            f.chmod(0o755 if f.is_dir() else 0o644)
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{tmp.name.rsplit('.tmp-', 1)[1]}")
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

"""What each stage reads from the task file, and its cache key computed from exactly that slice.

A stage's artifact is fresh when its key is unchanged: the same settings it reads, the same content of the
data files it reads, the same upstream artifact and the same recipe version. One mechanism for every stage:

- settings left at their default are not part of the key, so adding a new setting (with a default that
  keeps today's behaviour) never invalidates existing run folders;
- settings that change how fast or how far a stage goes, never what it produces (concurrency, budgets,
  timeouts, threads), are declared ``runtime_only`` and left out;
- a change in *how* a stage computes (not its settings) bumps its ``version``.

Re-running a stage whose key changed costs no teacher money: every call is answered from the ledger.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from protege.artifacts import fingerprint


def file_hash(path: Path | None) -> str | None:
    """Content hash (not mtime: an edit that keeps size and second must still invalidate the artifact)."""
    if path is None or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _dump(value: Any, exclude: set[str]) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_defaults=True, exclude=exclude or None)
    if isinstance(value, list):
        return [_dump(v, set()) for v in value]
    return value


@dataclass(frozen=True)
class Reads:
    """The slice of the task a stage depends on (dotted ``TaskSpec`` paths) and its recipe version."""

    stage: str
    fields: tuple[str, ...]
    files: tuple[str, ...] = ()            # dotted paths of data files whose content is part of the key
    runtime_only: frozenset[str] = frozenset()
    version: int = 1

    def slice(self, task) -> dict:
        """The settings this stage reads, as JSON (defaults and runtime-only settings left out)."""
        out = {}
        for f in self.fields:
            excl = {r.split(".", 1)[1] for r in self.runtime_only if r.startswith(f + ".") and r.count(".") == f.count(".") + 1}
            out[f] = _dump(_get(task, f), excl)
        return out

    def key(self, task, *, upstream: str | None = None, extra: dict | None = None) -> str:
        """The stage's cache key: its task slice, its files' content, the upstream key, extras, the version."""
        files = {f: file_hash(task.path(p)) if (p := _get(task, f)) else None for f in self.files}
        return fingerprint({"stage": self.stage, "v": self.version, "task": self.slice(task), "files": files,
                            "upstream": upstream, **(extra or {})})


GENERATE = Reads(
    "generate",
    fields=("kind", "instruction", "labels", "schema_", "examples", "input_field", "gold_field", "teacher",
            "data.inputs", "data.gold", "data.limit", "data.seed"),
    files=("data.inputs", "data.gold"),
    runtime_only=frozenset(f"teacher.{k}" for k in (
        "budget_usd", "concurrency", "timeout_s", "max_retries", "rpm", "tpm", "budget_tokens", "retry_base_s",
        "retry_max_s", "torch_threads", "api_key_env", "usd_per_hour", "price_in_per_1m",
        "price_out_per_1m", "engine", "ray_address", "ray_workers", "ray_gpus")),  # engine: who sends, not what
)
CURATE = Reads("curate", fields=("kind", "labels", "schema_", "curate", "data.seed"), files=("data.train", "data.gold"),
               runtime_only=frozenset({"curate.review_least_confident"}), version=2)
# 2: static student with n-gram block, convex fit, temperature; 3: the default student is auto (the ladder)
TRAIN = Reads("train", fields=("student", "train"), runtime_only=frozenset({"student.usd_per_hour", "student.engine"}), version=3)
EVALUATE = Reads("evaluate", fields=("evaluate", "volume_per_month", "student.usd_per_hour", "teacher.usd_per_hour",
                                     "teacher.price_in_per_1m", "teacher.price_out_per_1m"))

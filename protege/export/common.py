"""Stage 6 helpers every exporter shares: where the trained student is, its kind, the run's metadata and model
card, and the cache folder for converter tools."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from protege import __version__


def student_dir(run: Path) -> Path:
    d = Path(run) / "train" / "student"
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} has no trained student; run `protege train` (or `protege run`) first")
    return d


def student_kind(folder: Path) -> str:
    cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    return cfg.get("protege_student", "static")


def read_report(run: Path) -> dict | None:
    p = Path(run) / "report.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


def metadata(run: Path, task=None) -> dict:
    """What a deployment needs to know besides the weights: task, labels, cascade threshold, scores."""
    run = Path(run)
    folder = student_dir(run)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    rep = read_report(run) or {}
    kind = cfg.get("protege_student", "static")
    labels = cfg.get("labels") or cfg.get("protege_labels")
    if labels is None and isinstance(cfg.get("id2label"), dict):
        labels = [cfg["id2label"][str(i)] for i in range(len(cfg["id2label"]))]
    meta = {
        "protege_version": __version__, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "task": task.name if task is not None else rep.get("task"), "kind": task.kind if task is not None else
        rep.get("kind", "classify"), "student": kind, "labels": labels or (task.labels if task is not None else None),
        "threshold": (rep.get("cascade") or {}).get("threshold"),
        "cascade": {k: v for k, v in (rep.get("cascade") or {}).items() if k != "curve"} or None,
        "source_run": str(run.resolve()),
    }
    if task is not None:
        from protege.teachers.prompts import system_prompt

        meta["instruction"] = task.instruction
        meta["system_prompt"] = system_prompt(task)
    if rep:
        meta["scores"] = {"metric": rep.get("metric"), "n_eval": rep.get("n_eval"),
                          "student": (rep.get("student") or {}).get("score"),
                          "teacher": (rep.get("teacher") or {}).get("score"),
                          "agreement": (rep.get("student") or {}).get("agreement"), "retained": rep.get("retained")}
    return meta


def model_card(meta: dict, extra: str = "") -> str:
    sc = meta.get("scores") or {}
    lines = [f"# {meta.get('task') or 'protege student'} — protege {meta['student']} student", ""]
    if meta.get("labels"):
        lines.append(f"Labels: {', '.join(meta['labels'])}")
    if sc.get("student") is not None:
        lines.append(f"{sc['metric']} on {sc['n_eval']} held-out gold items: student {sc['student']:.3f}, "
                     f"teacher {sc['teacher']:.3f} (retained "
                     f"{'n/a' if sc.get('retained') is None else format(sc['retained'], '.3f')}, agreement "
                     f"{'n/a' if sc.get('agreement') is None else format(sc['agreement'], '.3f')})")
    if meta.get("threshold") is not None:
        lines.append(f"Cascade: answer with the student when its confidence >= {meta['threshold']:.3f}, "
                     f"else ask the teacher (chosen by `protege evaluate`).")
    lines += ["", "`protege.json` holds the task, labels, threshold and scores.", extra]
    return "\n".join(lines).rstrip() + "\n"


def metadata_light(task) -> dict:
    from protege.teachers.prompts import system_prompt

    return {"protege_version": __version__, "task": task.name, "kind": task.kind, "labels": task.labels,
            "system_prompt": system_prompt(task)}


def cache_root() -> Path:
    return Path(os.environ.get("PROTEGE_CACHE", Path.home() / ".cache" / "protege"))

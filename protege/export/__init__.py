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

import json
import os
import shutil
import time
from pathlib import Path

from .. import __version__
from ..artifacts import atomic_dir  # noqa: F401  (re-exported for the exporters)
from ..data import read_jsonl, write_json, write_jsonl

FORMATS = ("hf", "onnx", "gguf", "ollama", "jsonl")


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
        from ..teachers.base import system_prompt

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


# -- formats -----------------------------------------------------------------------------------

def export_hf(run: Path, dest: Path, task=None) -> dict:
    src = student_dir(run)
    meta = metadata(run, task)
    with atomic_dir(dest) as tmp:
        for f in src.iterdir():
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        write_json(tmp / "protege.json", meta)
        (tmp / "README.md").write_text(model_card(meta), encoding="utf-8")
    return {"format": "hf", "path": str(dest), "files": sorted(p.name for p in dest.iterdir()), "metadata": meta}


def chat_rows(rows: list[dict], system: str) -> list[dict]:
    return [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": r["text"]},
                          {"role": "assistant", "content": r["label"]}]} for r in rows]


def check_chat_jsonl(path: Path) -> int:
    """Validate an OpenAI chat fine-tuning file: one object per line, system/user/assistant turns, text."""
    n = 0
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        obj = json.loads(line)
        msgs = obj.get("messages")
        if not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "assistant":
            raise ValueError(f"{path}: line {i}: needs a messages list ending with an assistant turn")
        for m in msgs:
            if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str) \
                    or not m["content"].strip():
                raise ValueError(f"{path}: line {i}: bad message {m!r}")
        n += 1
    return n


def export_jsonl(run: Path, dest: Path, task) -> dict:
    """Curated rows as chat fine-tuning JSONL, split the way train splits them (teacher-labelled dev)."""
    if task is None:
        raise ValueError("jsonl export needs the task file (its instruction is the system prompt): pass --task")
    from ..teachers.base import system_prompt
    from ..train import dev_split, text_dev_split

    rows = read_jsonl(Path(run) / "curate" / "train.jsonl") if (Path(run) / "curate" / "train.jsonl").is_file() else None
    if not rows:
        raise FileNotFoundError(f"{Path(run) / 'curate' / 'train.jsonl'} not found or empty; run `protege curate` first")
    if task.kind == "classify":
        tr, dv = dev_split([r["label"] for r in rows], task.train.dev_fraction, task.train.seed)
    else:  # text rows carry their answer as `label` too; the same split the train stage uses
        tr, dv = text_dev_split(len(rows), task.train.dev_fraction, task.train.seed)
    system = system_prompt(task)
    with atomic_dir(dest) as tmp:
        write_jsonl(tmp / "train.jsonl", chat_rows([rows[i] for i in tr], system))
        write_jsonl(tmp / "validation.jsonl", chat_rows([rows[i] for i in dv], system))
        n_train, n_val = check_chat_jsonl(tmp / "train.jsonl"), check_chat_jsonl(tmp / "validation.jsonl")
        meta = {**metadata_light(task), "n_train": n_train, "n_validation": n_val,
                "sources": {s: sum(r.get("source", "teacher") == s for r in rows) for s in ("teacher", "real", "review")}}
        write_json(tmp / "protege.json", meta)
    notes = [] if n_train >= 10 else ["OpenAI fine-tuning needs at least 10 training examples"]
    return {"format": "jsonl", "path": str(dest), "n_train": n_train, "n_validation": n_val, "notes": notes}


def metadata_light(task) -> dict:
    from ..teachers.base import system_prompt

    return {"protege_version": __version__, "task": task.name, "kind": task.kind, "labels": task.labels,
            "system_prompt": system_prompt(task)}


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
        from .onnx import export_onnx

        return export_onnx(run, dest, task, **kw)
    from .gguf import export_gguf

    return export_gguf(run, dest, task, ollama=fmt == "ollama", **kw)


def cache_root() -> Path:
    return Path(os.environ.get("PROTEGE_CACHE", Path.home() / ".cache" / "protege"))

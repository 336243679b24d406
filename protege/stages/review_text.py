"""The review loop for extract / generate tasks: the teacher's wrong or doubtful answers, and corrected answers read back.

``protege review`` on a text task writes ``review/review.csv`` (+ ``review.html``, ``errors.json``) with one
row per item to look at, most confident first (a confident wrong answer is the one a student learns with
conviction):

- **gold** items whose teacher answer is not the gold answer (extract: not the same fields and values) —
  the teacher's systematic errors, per field in ``errors.json``; corrections of these are never trained on;
- **pool** items whose answer breaks the schema, whose samples disagree, or that the teacher was least
  sure of (geometric-mean token probability), and failed calls — corrections of these become training rows.

The reviewer writes the right answer in ``corrected_output`` (extract: the JSON object, checked against the
task's schema when read back; generate: the text) or ``drop``, then runs
``protege curate task.yaml --apply-review review.csv``. A corrected answer that is not JSON, or breaks the
schema, is an error naming the file, line and id; nothing is stored until every row reads.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path
from typing import Sequence

from protege.artifacts import require
from protege.data import load_gold, read_jsonl, write_json, write_text
from protege.kinds import kind_of
from protege.stages.review import (
    DROP,
    apply_reviewed,
    merge_corrections,
    corrections_path,
    render_review_html,
    review_item,
    review_order,
    write_review_csv,
)
from protege.task import TaskError, TaskSpec

COLUMNS = ["id", "source", "reason", "teacher_output", "teacher_confidence", "teacher_agreement", "gold_output",
           "corrected_output", "note", "text"]


def text_review_items(task: TaskSpec, pool: Sequence[dict], gold_teacher: Sequence[dict], gold: Sequence[dict], *,
                      least_confident: int = 20, prefill: dict[str, str] | None = None) -> list[dict]:
    """Rows of the sheet, most confident first, then id (``prefill``: earlier corrections, id → output)."""
    kind, prefill = kind_of(task), prefill or {}
    by_id = {r["id"]: r for r in gold_teacher}
    items: dict[str, dict] = {}
    for g in gold:
        t = by_id.get(g["id"])
        if t is not None and not kind.same_answer(t.get("output"), g["label"]):
            items[g["id"]] = _row(g["id"], "gold", "teacher≠gold", g["text"], t, g["label"])
    for r in pool:
        if r.get("status") != "ok":
            items[r["id"]] = _row(r["id"], "pool", "teacher failed", r["text"], r)
        elif kind.validity(r, schema=task.schema_):
            items[r["id"]] = _row(r["id"], "pool", "invalid answer", r["text"], r)
        elif int(r.get("samples") or 1) >= 2 and float(r.get("agreement", 1.0)) < 1.0:
            items[r["id"]] = _row(r["id"], "pool", "teacher≠itself", r["text"], r)
    rest = sorted((r for r in pool if r.get("status") == "ok" and r["id"] not in items),
                  key=lambda r: (float(r.get("confidence") or 0), r["id"]))
    for r in rest[:least_confident]:
        items[r["id"]] = _row(r["id"], "pool", "teacher unsure", r["text"], r)
    return review_order(items, prefill, "output")


def _row(id_: str, source: str, reason: str, text: str, t: dict, gold: str = "") -> dict:
    return review_item(id_, source, reason, text, t, gold, field="output")


def write_text_review_csv(path: Path, items: Sequence[dict]) -> None:
    write_review_csv(path, items, COLUMNS)


def read_text_corrections(path: str | Path, task: TaskSpec) -> dict[str, str]:
    """id → corrected answer (extract: compact JSON, valid against the schema) or ``"drop"``, for the rows whose
    ``corrected_output`` is filled. Anything unreadable raises :class:`TaskError` naming file, line, id, fix."""
    kind, p = kind_of(task), Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: review file not found")
    reader = csv.DictReader(io.StringIO(p.read_bytes().decode("utf-8-sig", errors="strict")))
    missing = {"id", "corrected_output"} - set(reader.fieldnames or [])
    if missing:
        raise TaskError(f"{p}: missing column(s) {sorted(missing)}; use the CSV `protege review` wrote for this "
                        f"kind: {task.kind} task (columns {', '.join(COLUMNS)})")
    out: dict[str, str] = {}
    for row in reader:
        c, key, line = (row.get("corrected_output") or "").strip(), (row.get("id") or "").strip(), reader.line_num
        if not c:
            continue
        if not key:
            raise TaskError(f"{p}: line {line}: corrected_output is set but id is empty; keep the id column as exported")
        if c.lower() == DROP:
            out[key] = DROP
            continue
        if kind.json:
            try:
                obj = json.loads(c)
            except json.JSONDecodeError as e:
                raise TaskError(f"{p}: line {line} (id {key}): corrected_output is not valid JSON ({e.msg} at "
                                f"character {e.pos}): {c[:80]!r}; write the whole object, e.g. "
                                f"{{\"field\": \"value\"}}, or '{DROP}'") from None
            c = json.dumps(obj, ensure_ascii=False)
            why = kind.validity({"output": c}, schema=task.schema_)
            if why:
                raise TaskError(f"{p}: line {line} (id {key}): corrected_output does not fit the task's schema: {why}")
        out[key] = c
    return out


def store_text_corrections(src: str | Path, out: Path, task: TaskSpec) -> tuple[Path, dict[str, str]]:
    """Validate ``src`` whole, then merge it into ``<out>/review/corrections.csv`` (``src`` wins per id)."""
    return merge_corrections(src, out, lambda p: read_text_corrections(p, task), "output")


def apply_text_corrections(task: TaskSpec, pool: list[dict], corrections: dict[str, str],
                           gold: dict[str, str]) -> tuple[list[dict], dict]:
    """Pool rows with a corrected answer become ``source="review"`` rows (no teacher top-k: SFT on the person's
    answer); ``drop`` marks a row dropped; gold ids are only counted (confirmed teacher error / disputed gold)."""
    kind = kind_of(task)
    return apply_reviewed(pool, corrections, gold, "output", lambda a, b: bool(b) and kind.same_answer(a, b),
                          lambda r, c: {"id": r["id"], "text": r["text"], "output": c, "label": c, "confidence": 1.0,
                                        "agreement": 1.0, "status": "ok", "source": "review", "topk_row": None,
                                        "teacher_output": r.get("output")})


def export_text_review(task: TaskSpec, out: Path) -> dict:
    """Write ``<out>/review/{review.csv, review.html, errors.json}`` for an extract / generate task."""
    from protege.stages.baseline.text import field_errors

    gen_dir, rdir = Path(out) / "generate", Path(out) / "review"
    require(gen_dir, "generate")
    pool, gold_teacher = read_jsonl(gen_dir / "train.jsonl"), read_jsonl(gen_dir / "gold.jsonl")
    gold = load_gold(task)
    stored = corrections_path(out)
    prefill = read_text_corrections(stored, task) if stored.is_file() else {}
    items = text_review_items(task, pool, gold_teacher, gold, least_confident=task.curate.review_least_confident,
                              prefill=prefill)
    by_id = {r["id"]: r.get("output") for r in gold_teacher}
    answered = [g for g in gold if g["id"] in by_id]
    golds, preds = [g["label"] for g in answered], [by_id[g["id"]] for g in answered]
    kind = kind_of(task)
    errors = field_errors(golds, preds) if kind.json else {
        "n": len(answered), "errors": sum(not kind.same_answer(p, g) for g, p in zip(golds, preds)), "per_label": [],
        "pairs": [], "by": "item"}
    write_text_review_csv(rdir / "review.csv", items)
    # the label page renders these rows too: its columns read teacher_label / gold_label
    shown = [{**it, "teacher_label": it["teacher_output"], "gold_label": it["gold_output"]} for it in items]
    write_text(rdir / "review.html", render_review_html(task.name, shown, errors).replace(
        "corrected_label</code> in <code>review.csv</code> (a label, or <code>drop</code>)",
        "corrected_output</code> in <code>review.csv</code> (the right answer" + (", as JSON" if kind.json else "")
        + ", or <code>drop</code>)"))
    write_json(rdir / "errors.json", errors)
    return {"dir": str(rdir), "csv": str(rdir / "review.csv"), "html": str(rdir / "review.html"),
            "n_items": len(items), "reasons": dict(Counter(it["reason"] for it in items)), "errors": errors,
            "prefilled": sum(1 for it in items if it["corrected_output"]), "column": "corrected_output"}

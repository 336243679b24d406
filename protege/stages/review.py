"""The review loop: show a person where the teacher is wrong or unsure, and read their answers back.

``protege review`` exports, as ``review/review.csv`` and a static ``review/review.html``:

- **gold** items where the teacher's answer differs from the gold label — the way to find the
  teacher's *systematic* errors (and the odd wrong gold label). Corrections of these are never
  trained on: gold stays held out. They are counted as confirmed teacher errors or disputed gold;
- **pool** items where the teacher disagrees with itself (its samples / prompt variants split) or is
  least confident — corrections of these become real labelled training data.

Both files are sorted by teacher confidence, most confident first: a confident disagreement with gold
is the costliest kind (the student will learn it with conviction) and the likeliest to be a gold
error. The reviewer fills ``corrected_label`` (a label, or ``drop`` to remove the item from training)
and runs ``protege curate task.yaml --apply-review review.csv``.

``errors.json`` holds the teacher-vs-gold confusion and its labels ranked worst first.
"""

from __future__ import annotations

import csv
import html
import io
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from protege.kinds import kind_of
from protege.artifacts import require
from protege.data import load_gold, read_jsonl, write_json, write_text
from protege.task import TaskError, TaskSpec

COLUMNS = ["id", "source", "reason", "teacher_label", "teacher_confidence", "teacher_agreement", "gold_label",
           "corrected_label", "note", "text"]
DROP = "drop"


# -- what to review (pure) ---------------------------------------------------------------------

def corrections_path(out: Path) -> Path:
    """Where ``protege curate --apply-review`` keeps the accepted corrections for later runs."""
    return Path(out) / "review" / "corrections.csv"


def review_items(pool: Sequence[dict], gold_teacher: Sequence[dict], gold: Sequence[dict], *,
                 least_confident: int = 20, prefill: dict[str, str] | None = None) -> list[dict]:
    """Rows for the review sheet, sorted by teacher confidence (high first), then id.

    ``pool`` / ``gold_teacher`` are generate's ``train.jsonl`` / ``gold.jsonl`` rows; ``gold`` has
    ``id, text, label``. ``prefill`` (id → label) carries earlier corrections into a fresh sheet.
    """
    prefill = prefill or {}
    teacher_on_gold = {r["id"]: r for r in gold_teacher}
    items: dict[str, dict] = {}
    for g in gold:
        t = teacher_on_gold.get(g["id"])
        if t is None or t.get("label") == g["label"]:
            continue
        items[g["id"]] = review_item(g["id"], "gold", "teacher≠gold", g["text"], t, g["label"])
    ok = [r for r in pool if r.get("status") == "ok"]
    for r in ok:
        if int(r.get("samples") or 1) >= 2 and float(r.get("agreement", 1.0)) < 1.0:
            items[r["id"]] = review_item(r["id"], "pool", "teacher≠itself", r["text"], r)
    unsure = sorted((r for r in ok if r["id"] not in items), key=lambda r: (float(r.get("confidence") or 0), r["id"]))
    for r in unsure[:least_confident]:
        items[r["id"]] = review_item(r["id"], "pool", "teacher unsure", r["text"], r)
    for r in pool:
        if r.get("status") != "ok":
            items[r["id"]] = review_item(r["id"], "pool", "teacher failed", r["text"], r)
    return review_order(items, prefill)


def review_order(items: dict[str, dict], prefill: dict[str, str], field: str = "label") -> list[dict]:
    """The items most confidently wrong first (a confident teacher error teaches the student most harm), with
    ``corrected_<field>`` pre-filled from an earlier review."""
    out = sorted(items.values(), key=lambda x: (-(x["teacher_confidence"] or 0.0), x["id"]))
    for x in out:
        x[f"corrected_{field}"] = prefill.get(x["id"], "")
    return out


def apply_reviewed(pool: list[dict], corrections: dict[str, str], gold: dict[str, str], field: str,
                   same: Callable[[str, str | None], bool], reviewed: Callable[[dict, str], dict]
                   ) -> tuple[list[dict], dict]:
    """Pool rows with a reviewer's answer become ``reviewed(row, answer)`` (``source="review"``), ``drop`` marks a
    row dropped; gold ids are never returned, only counted: a confirmed teacher error (the reviewer gave the gold
    answer, or dropped it) or a disputed gold answer. ``same(a, b)``: whether two answers agree (``b`` may be
    None); the pool row's answer is ``row[field]``. Returns (rows, review stats)."""
    by_id = {r["id"]: r for r in pool}
    out, stats = [], {"n_corrections": len(corrections), "pool_relabelled": 0, "pool_confirmed": 0,
                      "pool_dropped": 0, "gold_confirmed": 0, "gold_disputed": [], "unknown_ids": []}
    for r in pool:
        c = corrections.get(r["id"])
        if c is None:
            out.append(r)
        elif c == DROP:
            out.append({**r, "_drop": "review_dropped"})
            stats["pool_dropped"] += 1
        else:
            stats["pool_confirmed" if same(c, r.get(field)) else "pool_relabelled"] += 1
            out.append(reviewed(r, c))
    for k, c in corrections.items():
        if k in by_id:
            continue
        if k in gold:
            if c == DROP or same(c, gold[k]):
                stats["gold_confirmed"] += c != DROP
            else:
                stats["gold_disputed"].append({"id": k, "gold": gold[k], "reviewer": c})
        else:
            stats["unknown_ids"].append(k)
    stats["unknown_ids"] = stats["unknown_ids"][:20]
    return out, stats


def review_item(id_: str, source: str, reason: str, text: str, t: dict, gold: str = "", field: str = "label") -> dict:
    """One row of the review sheet: the teacher's answer (``t[field]``: ``label`` or ``output``) and why it is here."""
    conf = t.get("confidence")
    return {"id": id_, "source": source, "reason": reason, f"teacher_{field}": t.get(field) or "",
            "teacher_confidence": None if conf is None else round(float(conf), 4),
            "teacher_agreement": t.get("agreement"), f"gold_{field}": gold, f"corrected_{field}": "", "note": "",
            "text": text}


def systematic_errors(gold: Sequence[str], teacher: Sequence[str | None], labels: Sequence[str]) -> dict:
    """Teacher-vs-gold confusion, labels ranked worst first (lowest recall, then most errors).

    ``confusion[i][j]`` counts gold ``labels[i]`` answered ``labels[j]``; the last column counts
    answers outside the label set. ``pairs`` lists the off-diagonal cells, largest first.
    """
    k = len(labels)
    pos = {lab: i for i, lab in enumerate(labels)}
    m = [[0] * (k + 1) for _ in range(k)]
    for g, p in zip(gold, teacher):
        m[pos[g]][pos.get(p, k) if p is not None else k] += 1
    per_label = []
    for i, lab in enumerate(labels):
        n = sum(m[i])
        wrong = n - m[i][i]
        predicted = sum(m[r][i] for r in range(k))
        top = max(((m[i][j], j) for j in range(k + 1) if j != i), default=(0, None))
        per_label.append({"label": lab, "n": n, "errors": wrong, "recall": (m[i][i] / n) if n else None,
                          "precision": (m[i][i] / predicted) if predicted else None,
                          "most_confused_with": (labels[top[1]] if top[1] < k else "(invalid)") if top[0] else None})
    per_label.sort(key=lambda d: (d["recall"] if d["recall"] is not None else 2.0, -d["errors"], d["label"]))
    names = list(labels) + ["(invalid)"]
    pairs = sorted(({"gold": labels[i], "teacher": names[j], "n": m[i][j]} for i in range(k) for j in range(k + 1)
                    if j != i and m[i][j]), key=lambda d: (-d["n"], d["gold"], d["teacher"]))
    n = len(gold)
    return {"labels": list(labels), "confusion": m, "n": n, "errors": sum(d["errors"] for d in per_label),
            "accuracy": (sum(m[i][i] for i in range(k)) / n) if n else None, "per_label": per_label, "pairs": pairs}


# -- files -------------------------------------------------------------------------------------

def write_review_csv(path: Path, items: Sequence[dict], columns: Sequence[str] = COLUMNS) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for it in items:
        w.writerow({k: "" if it.get(k) is None else it.get(k) for k in columns})
    write_text(path, buf.getvalue())


def read_corrections(path: str | Path, labels: Sequence[str]) -> dict[str, str]:
    """id → corrected label (or ``"drop"``) for the rows of a review CSV whose ``corrected_label`` is filled.

    Labels match case-insensitively; anything else is an error naming the file, the row and the fix.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: review file not found")
    text = p.read_bytes().decode("utf-8-sig", errors="strict")
    reader = csv.DictReader(io.StringIO(text))
    missing = {"id", "corrected_label"} - set(reader.fieldnames or [])
    if missing:
        raise TaskError(f"{p}: missing column(s) {sorted(missing)}; use the CSV `protege review` wrote "
                        f"(columns {', '.join(COLUMNS)})")
    by_lower = {lab.lower(): lab for lab in labels}
    out: dict[str, str] = {}
    for i, row in enumerate(reader, start=2):
        c = (row.get("corrected_label") or "").strip()
        if not c:
            continue
        key = (row.get("id") or "").strip()
        if not key:
            raise TaskError(f"{p}: line {i}: corrected_label is set but id is empty; keep the id column as exported")
        if c.lower() == DROP:
            out[key] = DROP
        elif c.lower() in by_lower:
            out[key] = by_lower[c.lower()]
        else:
            raise TaskError(f"{p}: line {i}: corrected_label {c!r} is not one of the labels {list(labels)} "
                            f"(or '{DROP}' to leave the item out of training)")
    return out


def store_corrections(src: str | Path, out: Path, labels: Sequence[str]) -> tuple[Path, dict[str, str]]:
    """Validate ``src`` and merge it into ``<out>/review/corrections.csv`` (``src`` wins per id).

    Kept in the run folder so that every later ``curate`` / ``run`` applies the same corrections.
    Returns (stored path, the corrections read from ``src``).
    """
    return merge_corrections(src, out, lambda p: read_corrections(p, labels), "label")


def merge_corrections(src: str | Path, out: Path, read: Callable[[str | Path], dict[str, str]], field: str
                      ) -> tuple[Path, dict[str, str]]:
    """``read(src)`` (which validates it whole, raising before anything is written) merged into the run's
    ``review/corrections.csv``, ``src`` winning per id. Returns (stored path, what ``src`` held)."""
    new = read(src)
    dest = corrections_path(out)
    merged = read(dest) if dest.is_file() else {}
    merged.update(new)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", f"corrected_{field}"])
    for k in sorted(merged):
        w.writerow([k, merged[k]])
    write_text(dest, buf.getvalue())
    return dest, new


# -- html --------------------------------------------------------------------------------------

_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;width:100%}
td,th{border-bottom:1px solid #ddd;padding:4px 6px;text-align:left;vertical-align:top}th{background:#f4f4f4}
.num{text-align:right;font-variant-numeric:tabular-nums}.gold{background:#fff4e5}.wrong{color:#b30000;font-weight:600}
details summary{cursor:pointer;color:#333}small{color:#666}"""


def render_review_html(task_name: str, items: Sequence[dict], errors: dict | None) -> str:
    e = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><title>{e(task_name)}: review</title><style>{_CSS}</style>",
             f"<h1>{e(task_name)}: teacher review</h1>",
             "<p>Items where the teacher disagrees with gold or with itself, or is least sure, most confident first. "
             "Fill <code>corrected_label</code> in <code>review.csv</code> (a label, or <code>drop</code>) and run "
             "<code>protege curate task.yaml --apply-review review.csv</code>. Pool corrections become real training "
             "data; gold corrections are never trained on.</p>"]
    if errors and errors["n"]:
        parts.append(f"<h2>Teacher systematic errors on gold ({errors['errors']} of {errors['n']} wrong)</h2>")
        parts.append("<table><tr><th>gold label</th><th class=num>n</th><th class=num>errors</th>"
                     "<th class=num>recall</th><th class=num>precision</th><th>most often answered instead</th></tr>")
        for d in errors["per_label"]:
            parts.append(f"<tr><td>{e(d['label'])}</td><td class=num>{d['n']}</td><td class=num>{d['errors']}</td>"
                         f"<td class=num>{_pct(d['recall'])}</td><td class=num>{_pct(d['precision'])}</td>"
                         f"<td>{e(d['most_confused_with'] or '—')}</td></tr>")
        parts.append("</table><p><small>Top confusions: " + ", ".join(
            f"{e(p['gold'])} → {e(p['teacher'])} ({p['n']})" for p in errors["pairs"][:8]) + "</small></p>")
    counts = Counter(it["reason"] for it in items)
    parts.append(f"<h2>{len(items)} items to review</h2><p><small>" +
                 ", ".join(f"{e(k)}: {v}" for k, v in counts.most_common()) + "</small></p>")
    parts.append("<table><tr><th>#</th><th>id</th><th>source</th><th>reason</th><th>teacher</th>"
                 "<th class=num>confidence</th><th class=num>agreement</th><th>gold</th><th>text</th></tr>")
    for n, it in enumerate(items, 1):
        text = it["text"]
        short = e(text[:280]) + ("…" if len(text) > 280 else "")
        body = f"<details><summary>{short}</summary>{e(text)}</details>" if len(text) > 280 else short
        cls = " class=gold" if it["source"] == "gold" else ""
        wrong = " class=wrong" if it["gold_label"] and it["gold_label"] != it["teacher_label"] else ""
        conf = "" if it["teacher_confidence"] is None else f"{it['teacher_confidence']:.3f}"
        agr = "" if it["teacher_agreement"] is None else f"{float(it['teacher_agreement']):.2f}"
        parts.append(f"<tr{cls}><td class=num>{n}</td><td><code>{e(it['id'])}</code></td><td>{e(it['source'])}</td>"
                     f"<td>{e(it['reason'])}</td><td{wrong}>{e(it['teacher_label'])}</td><td class=num>{conf}</td>"
                     f"<td class=num>{agr}</td><td>{e(it['gold_label'])}</td><td>{body}</td></tr>")
    parts.append("</table>")
    return "\n".join(parts)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


# -- the command -------------------------------------------------------------------------------

def export_review(task: TaskSpec, out: Path) -> dict:
    """Write ``<out>/review/{review.csv, review.html, errors.json}``; return a summary.

    Files are replaced one by one (atomically); ``corrections.csv`` from earlier ``--apply-review``
    runs is left alone and its labels are pre-filled into the new sheet.
    """

    if not kind_of(task).labelled:
        raise TaskError(f"protege review exports label corrections, so it covers classify tasks; this task is "
                        f"kind: {task.kind}. Its teacher-vs-gold errors are in report.html (worst errors: gold, "
                        f"teacher and student output side by side) and evaluate/items.jsonl")
    gen_dir, rdir = Path(out) / "generate", Path(out) / "review"
    require(gen_dir, "generate")
    pool, gold_teacher = read_jsonl(gen_dir / "train.jsonl"), read_jsonl(gen_dir / "gold.jsonl")
    gold = load_gold(task)
    stored = corrections_path(out)
    prefill = read_corrections(stored, task.labels) if stored.is_file() else {}
    items = review_items(pool, gold_teacher, gold, least_confident=task.curate.review_least_confident, prefill=prefill)
    by_id = {r["id"]: r.get("label") for r in gold_teacher}
    answered = [g for g in gold if g["id"] in by_id]
    errors = systematic_errors([g["label"] for g in answered], [by_id[g["id"]] for g in answered], task.labels)
    write_review_csv(rdir / "review.csv", items)
    write_text(rdir / "review.html", render_review_html(task.name, items, errors))
    write_json(rdir / "errors.json", errors)
    return {"dir": str(rdir), "csv": str(rdir / "review.csv"), "html": str(rdir / "review.html"),
            "n_items": len(items), "reasons": dict(Counter(it["reason"] for it in items)), "errors": errors,
            "prefilled": sum(1 for it in items if it["corrected_label"])}

"""``protege redistill``: fold served traffic into a new round and promote the result only if it is better.

What the gateway recorded becomes training data:

- inputs the **teacher** answered — escalations, capture mode, shadow checks — join the inputs to label.
  They were asked through the ledger with the task's own prompt, and the candidate round starts from a
  copy of the run's ledger, so labelling them again is a cache hit: no new teacher cost;
- inputs a **person** answered in the review queue join the real labelled data (``data.train``),
  which curate mixes in with ``curate.real_weight`` and never second-guesses;
- corrections stored by ``curate --apply-review`` (``<run>/review/corrections.csv``) are copied into the
  candidate, so it is trained on them just as the current student was.

The candidate runs generate → curate → train → evaluate in ``<run>/redistill/<stamp>/`` with a derived
task file there (same gold file: the comparison is on the same held-out items). It replaces the run's
stages only when its student scores higher on gold than the current one (by more than ``min_gain``);
the replaced stages are kept in ``<stamp>/previous/``. Restart ``protege serve`` to load it.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path

import yaml

from protege.teachers.ledger import Ledger
from protege.data import data_file, load_real_train, read_jsonl, read_rows, write_jsonl
from protege.task import TaskSpec, load_task

STAGES = ("generate", "curate", "train", "evaluate", "report.json", "report.html")


def collect(store_path: Path, labels: list[str]) -> tuple[list[str], list[dict], dict]:
    """(texts the teacher answered, rows a person labelled, counts) from ``traffic.sqlite``."""
    if not Path(store_path).is_file():
        return [], [], {"teacher_answered": 0, "reviewed": 0, "review_dropped": 0}
    db = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True, timeout=30)
    try:
        rows = db.execute("SELECT text FROM requests WHERE text IS NOT NULL AND teacher_label IS NOT NULL "
                          "UNION SELECT text FROM shadow WHERE text IS NOT NULL AND teacher_label IS NOT NULL").fetchall()
        reviewed = db.execute("SELECT text, answer FROM review WHERE status = 'answered'").fetchall()
        dropped = db.execute("SELECT count(*) FROM review WHERE status = 'dropped'").fetchone()[0]
    finally:
        db.close()
    texts = sorted({r[0] for r in rows if r[0] and r[0].strip()})
    human = [{"text": t, "label": a} for t, a in reviewed if a in labels]
    return texts, human, {"teacher_answered": len(texts), "reviewed": len(human), "review_dropped": int(dropped),
                          "review_unknown_labels": len(reviewed) - len(human)}


def _copy_ledger(src: Path, dst: Path) -> None:
    """A consistent copy of a live SQLite file (the gateway may be writing to it)."""
    if not src.is_file():
        return
    a, b = sqlite3.connect(str(src), timeout=30), sqlite3.connect(str(dst))
    try:
        a.backup(b)
    finally:
        a.close()
        b.close()


def fold_ledger(src: Path, dst: Path) -> None:
    """The candidate's calls into the run's ledger with :meth:`Ledger.merge` (the one merge: a success replaces
    a failure of the same request, two successes keep the earlier)."""
    if not Path(dst).is_file():
        shutil.copy2(src, dst)
        return
    with Ledger(dst) as led:
        led.merge(src)


def derived_task(task: TaskSpec, run: Path, folder: Path, texts: list[str], human: list[dict]) -> Path:
    """Task file for the candidate: the inputs labelled last time + traffic, real data + reviewed rows.

    Its data files sit beside it and are named relative to it (``load_task`` resolves them against the task
    file's folder, whatever the current directory); the gold file is the run's own, by absolute path."""
    f_in, f_gold = task.input_field, task.gold_field
    labelled = [r["text"] for r in read_jsonl(run / "generate" / "train.jsonl")] \
        if (run / "generate" / "train.jsonl").is_file() else [r[f_in] for r in read_rows(data_file(task, "inputs"))]
    seen, inputs = set(), []
    for t in labelled + texts:
        if t not in seen:
            seen.add(t)
            inputs.append({f_in: t})
    write_jsonl(folder / "inputs.jsonl", inputs)
    # load_real_train gives {text, label} with the answer as text (labels, or compact JSON for extract)
    real = [{f_in: r["text"], f_gold: r["label"]} for r in load_real_train(task)]
    real += [{f_in: h["text"], f_gold: h["label"]} for h in human]
    spec = task.model_dump(mode="json", exclude={"root"}, by_alias=True)
    spec["data"].update(inputs="inputs.jsonl", gold=str(data_file(task, "gold").resolve()), limit=None)
    if real:
        write_jsonl(folder / "train.jsonl", real)
        spec["data"]["train"] = "train.jsonl"
    if task.curate.review_file:
        spec["curate"]["review_file"] = str(task.path(task.curate.review_file).resolve())
    path = folder / "task.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def carry_corrections(run: Path, cand: Path) -> int:
    """Copy the corrections ``curate --apply-review`` stored in the run into the candidate (ids are text
    hashes, so they still name the same inputs): the new round trains on them, as the current student did."""
    from protege.stages.review import corrections_path

    src, dst = corrections_path(run), corrections_path(cand)
    if not src.is_file():
        return 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
    return max(0, len(src.read_text(encoding="utf-8").splitlines()) - 1)


def better(new: dict, old: dict | None, min_gain: float = 0.0) -> tuple[bool, str]:
    """Whether the candidate's report beats the current one on the same gold items."""
    if old is None:
        return True, "no current report to beat"
    if new.get("n_eval") != old.get("n_eval") or new.get("metric") != old.get("metric"):
        return False, (f"not comparable: {new.get('n_eval')} vs {old.get('n_eval')} gold items, "
                       f"{new.get('metric')} vs {old.get('metric')}")
    a, b = new["student"]["score"], old["student"]["score"]
    if a > b + min_gain:
        return True, f"student {new['metric']} {a:.4f} > current {b:.4f} (+{a - b:.4f}) on {new['n_eval']} gold items"
    return False, f"student {new['metric']} {a:.4f} is not above current {b:.4f} + {min_gain} on {new['n_eval']} gold items"


def redistill(task: TaskSpec, run: Path, *, min_gain: float = 0.0, promote: bool = True,
              store: Path | None = None) -> dict:
    from protege.pipeline import run as run_pipeline

    run = Path(run).resolve()  # a relative run folder (the default runs/<task>) must not depend on the cwd later
    store = Path(store).resolve() if store else run / "serve" / "traffic.sqlite"
    texts, human, counts = collect(store, task.labels)
    if not texts and not human:
        return {"status": "nothing new", "counts": counts, "promoted": False,
                "reason": f"no teacher-answered or reviewed traffic in {store}"}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cand = run / "redistill" / stamp
    (cand / "task").mkdir(parents=True, exist_ok=True)
    task_file = derived_task(task, run, cand / "task", texts, human)
    counts["corrections"] = carry_corrections(run, cand)
    new_task = load_task(task_file)
    _copy_ledger(run / "ledger.sqlite", cand / "ledger.sqlite")
    report = run_pipeline(new_task, cand).report.to_dict()
    old = json.loads((run / "report.json").read_text(encoding="utf-8")) if (run / "report.json").is_file() else None
    ok, why = better(report, old, min_gain)
    promoted = False
    if ok and promote:
        prev = cand / "previous"
        prev.mkdir(exist_ok=True)
        for name in STAGES:
            if (run / name).exists():
                (run / name).rename(prev / name)
            if (cand / name).exists():
                (cand / name).rename(run / name)
        fold_ledger(cand / "ledger.sqlite", run / "ledger.sqlite")
        promoted = True
    return {"status": "promoted" if promoted else ("better, not promoted" if ok else "kept current"),
            "promoted": promoted, "reason": why, "counts": counts, "candidate": str(cand), "task_file": str(task_file),
            "new_score": report["student"]["score"], "old_score": None if old is None else old["student"]["score"],
            "metric": report["metric"], "n_eval": report["n_eval"]}

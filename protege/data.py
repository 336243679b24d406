"""Reading task data (jsonl / csv / parquet) with errors that name the file, the row and the fix.

Rows are plain dicts. We parse jsonl and csv ourselves rather than through ``datasets.load_dataset``
because a user's first run usually fails on the data, and "line 812: missing field 'text'" is worth
more than a pyarrow stack trace. Parquet goes through pyarrow.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from protege.kinds import kind_of
from protege.task import TaskError, TaskSpec


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read all rows of a jsonl / json / csv / parquet file."""
    p = Path(path)
    if not p.is_file():
        raise TaskError(f"{p}: data file not found — check the path in the task file (relative paths start at the task file's folder)")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(p).to_pylist()
    else:
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise TaskError(f"{p}: line {line} is not UTF-8 (byte {e.start}); re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
        if suffix in (".jsonl", ".ndjson"):
            rows = []
            for i, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskError(f"{p}: line {i} is not valid JSON ({e.msg}); each line must be one JSON object") from None
                if not isinstance(obj, dict):
                    raise TaskError(f"{p}: line {i} is a JSON {type(obj).__name__}, expected an object like {{\"text\": ...}}")
                rows.append(obj)
        elif suffix == ".json":
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise TaskError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
            if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
                raise TaskError(f"{p}: a .json data file must hold a list of objects")
            rows = obj
        elif suffix in (".csv", ".tsv"):
            rows = list(csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ","))
        else:
            raise TaskError(f"{p}: unknown data format {suffix!r}; use .jsonl, .json, .csv, .tsv or .parquet")
    if not rows:
        raise TaskError(f"{p}: the file has no rows; it needs at least one")
    return rows


def check_rows(rows: list[dict], path: str | Path, field: str, labels: list[str] | None = None, label_field: str | None = None) -> None:
    """Every row has a non-empty string ``field``; if ``labels`` given, ``label_field`` is one of them."""
    for i, r in enumerate(rows, 1):
        v = r.get(field)
        if not isinstance(v, str) or not v.strip():
            what = "is missing" if field not in r else f"is empty or not text ({type(v).__name__})"
            raise TaskError(f"{path}: row {i}: field '{field}' {what}; every row needs it (input_field in the task file names it)")
        if labels is not None and label_field is not None:
            g = r.get(label_field)
            if g is None:
                raise TaskError(f"{path}: row {i}: gold field '{label_field}' is missing; add it or set gold_field in the task file")
            if str(g) not in labels:
                raise TaskError(f"{path}: row {i}: label {g!r} is not one of the task's labels {labels}; fix the row or add the label to 'labels'")


def text_key(text: str) -> str:
    """Stable id for an input text (used to join teacher outputs with rows and to detect leaks)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def data_file(task: TaskSpec, key: str) -> Path:
    """The task's ``data.<key>`` file, resolved against the task file's folder; a missing file is a
    :class:`TaskError` naming the key, the path it resolved to and the fix (not a bare ``[Errno 2]``)."""
    value = getattr(task.data, key)
    p = task.path(value)
    if not p.is_file():
        raise TaskError(f"{p}: data file not found (data.{key}: {value!r} in the task file); fix data.{key} — "
                        f"relative paths start at the task file's folder ({task.root})")
    return p


# Fewer distinct inputs than this and no student can be trained: refuse before the teacher is paid.
MIN_INPUTS = 2


def input_pool(task: TaskSpec) -> tuple[list[dict], dict]:
    """(inputs ``{id, text}`` in file order, counts): the input file's rows minus exact duplicates of an
    earlier row and minus texts that are also gold inputs. ``counts`` = rows / duplicates / in_gold / distinct."""
    path = data_file(task, "inputs")
    rows = read_rows(path)
    check_rows(rows, path, task.input_field)
    gold_keys = {r["id"] for r in load_gold(task)}  # gold rows are already {id, text, label}
    seen: set[str] = set()
    out, dup, in_gold = [], 0, 0
    for r in rows:
        k = text_key(r[task.input_field])
        if k in seen:
            dup += 1
            continue
        seen.add(k)
        if k in gold_keys:  # never let a gold item into training
            in_gold += 1
            continue
        out.append({"id": k, "text": r[task.input_field]})
    return out, {"file": str(path), "rows": len(rows), "duplicates": dup, "in_gold": in_gold, "distinct": len(out)}


def describe_pool(c: dict) -> str:
    """One clause: how the input file's rows became the inputs to label."""
    return (f"{c['file']}: {c['rows']} rows, {c['duplicates']} exact duplicates of an earlier row and "
            f"{c['in_gold']} also in the gold file removed, {c['distinct']} distinct inputs left")


def load_inputs(task: TaskSpec, *, min_inputs: int = MIN_INPUTS) -> list[dict]:
    """Unlabelled inputs for the teacher, shuffled with the task seed, minus anything that is in gold.

    Fewer than ``min_inputs`` distinct inputs is a :class:`TaskError` that says what was removed: checked
    before any teacher call, because no student can be trained from them."""
    out, counts = input_pool(task)
    if len(out) < min_inputs:
        raise TaskError(f"{describe_pool(counts)}; need at least {min_inputs} distinct inputs that are not in "
                        f"the gold file to train a student — add more varied rows to data.inputs")
    random.Random(task.data.seed).shuffle(out)
    if task.data.limit:
        out = out[: task.data.limit]
    return out


def gold_value(task: TaskSpec, row: dict, path, i: int) -> str:
    """A row's gold answer as text: the label (classify), compact JSON of the object (extract; the field may
    hold an object or a JSON string), or the reference text (generate)."""
    field = task.gold_field
    if field not in row or row[field] is None:
        raise TaskError(f"{path}: row {i}: gold field '{field}' is missing; add it or set gold_field in the task file")
    return kind_of(task).gold_value(row[field], f"{path}: row {i}: gold field '{field}'")


def _labelled(task: TaskSpec, path) -> list[dict]:
    rows = read_rows(path)
    classify = kind_of(task).labelled
    check_rows(rows, path, task.input_field, task.labels if classify else None, task.gold_field if classify else None)
    return [{"id": text_key(r[task.input_field]), "text": r[task.input_field], "label": gold_value(task, r, path, i)}
            for i, r in enumerate(rows, 1)]


def load_gold(task: TaskSpec) -> list[dict]:
    """Held-out gold rows ``{id, text, label}``; ``label`` is the gold answer as text (see :func:`gold_value`)."""
    return _labelled(task, data_file(task, "gold"))


def load_real_train(task: TaskSpec) -> list[dict]:
    if not task.data.train:
        return []
    return _labelled(task, data_file(task, "train"))


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator:
    """A text file handle whose content appears at ``path`` only when the block ends without error: a temp
    file in the same folder, then rename. A killed process never leaves a half file that looks whole."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            yield f
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` atomically (see :func:`atomic_file`); line endings are written as given."""
    with atomic_file(path) as f:
        f.write(text)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Write rows atomically: a temp file in the same folder, then rename."""
    with atomic_file(path) as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path: str | Path, obj: Any, *, allow_nan: bool = True) -> None:
    """Write ``obj`` as indented JSON, atomically; ``allow_nan=False`` refuses NaN / Infinity (strict JSON)."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str, allow_nan=allow_nan))

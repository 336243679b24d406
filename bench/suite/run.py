"""The task suite: per task and label budget, students trained on the same simulated-teacher labels, scored
on the same held-out gold items.

    python bench/suite/run.py [--quick] [--tasks a,b] [--budgets 1000,4000,16000] [--json out.json]

For every task (bench/suite/tasks.py) a simulated strong teacher (bench/suite/teacher.py: ~10% wrong, with
errors on hard items and confusable label pairs) labels a seeded random sample of the pool, one sample per
budget (nested: the 1k sample is the start of the 4k one; a budget above the pool size means "all of it").
Every student maker then fits on those teacher labels and is scored on gold: accuracy with a 95% bootstrap
CI, agreement with the teacher on gold, the share of the teacher's gold accuracy it keeps, a paired
McNemar p-value against the reference student (the first maker: protege's current default), ms/item one
item at a time (p50) and training seconds. Gold labels are never trained on.

**How the teacher labels get here.** The rows of the table take the teacher's answers straight from
``SimulatedTeacher.label`` — the same arrays the HTTP server answers from, with the soft labels cut to the
top 20 labels and renormalised as protege's openai teacher reads them from ``top_logprobs``. One row per
run (``--e2e``, default: the first task at the smallest budget) goes through the real thing end to end:
``protege run`` in a subprocess against the simulated teacher served on 127.0.0.1 (generate with the
ledger, curate, train with protege's default student, evaluate); its teacher score there is measured
over HTTP.

**Student makers** (``MAKERS``): a maker is ``fit(texts, teacher_labels, labels, probs=None) -> model``
where ``probs`` [n, C] are the teacher's soft labels over ``labels`` (or None) and the model has
``predict(texts) -> list[str]`` and ``predict_proba(texts) -> [n, C]``. The peers reuse bench/peers.py's
building blocks. To add a student (the ladder's ``auto``), append a ``Maker`` — or pass ``makers=`` to
:func:`run_suite`; the first maker is the reference for the p-values (pass ``reference=`` to change it).

``--quick`` (≤ 10 min on 2 busy cores): the five short-text tasks, budget 1,000, SetFit with 256 pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # BLAS on one core, like torch: on a
    os.environ.setdefault(_v, "1")  # busy 2-core machine multi-threaded BLAS in the LR fits competes with every other process
import warnings

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*least populated class.*")  # tail labels with < 5 teacher labels

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for p in (HERE, HERE.parent):  # bench/suite (tasks, teacher) and bench (peers)
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import peers  # noqa: E402  bench/peers.py
from tasks import TASKS, MissingData, SuiteTask, load_task, write_task_folder  # noqa: E402
from teacher import SimulatedTeacher, serve  # noqa: E402

from protege import metrics as M  # noqa: E402

QUICK_TASKS = ["sms-spam", "tweet-sentiment", "trec-fine", "snips-intents", "thucnews-zh"]
TOP_LOGPROBS = 20


# -- student makers ----------------------------------------------------------------------------

@dataclass
class Maker:
    """A student recipe. ``fit(texts, teacher_labels, labels, probs=None)`` returns a model with
    ``predict`` / ``predict_proba``; ``n_single`` items are timed one call each (slow models get fewer)."""

    name: str
    fit: Callable[..., Any]
    n_single: int = 100
    batch: int | None = None
    note: str = ""


class _EmbedLR:
    """sentence vectors -> logistic regression (C by 5-fold CV on the teacher labels: bench/peers.lr_cv)."""

    def __init__(self, encode: Callable[[list[str]], np.ndarray], labels: list[str]):
        self.encode, self.labels = encode, labels

    def fit(self, texts, y, encode_train=None):
        self.clf = peers.lr_cv((encode_train or self.encode)(list(texts)), list(y))
        self._cols = [list(self.clf.classes_).index(lab) if lab in self.clf.classes_ else None for lab in self.labels]
        return self

    def predict(self, texts):
        return list(self.clf.predict(self.encode(list(texts))))

    def predict_proba(self, texts):
        return _reindex(self.clf.predict_proba(self.encode(list(texts))), self._cols)


def _reindex(P: np.ndarray, cols: list[int | None]) -> np.ndarray:
    """Columns of a classifier fitted on the labels the teacher used -> columns in task label order."""
    out = np.zeros((len(P), len(cols)))
    for k, c in enumerate(cols):
        if c is not None:
            out[:, k] = P[:, c]
    return out


def fit_protege_static(texts, teacher_labels, labels, probs=None):
    """protege's current default student (``student.kind: static`` with the TaskSpec defaults), fitted exactly as
    ``protege train`` fits its final model (bench/peers.protege_static_retrained: all rows, soft + hard loss)."""
    from protege.task import TaskSpec

    task = TaskSpec.model_validate({"name": "suite", "kind": "classify", "instruction": "-", "labels": list(labels),
                                    "data": {"inputs": "-", "gold": "-"}, "teacher": {"model": "sim"}})
    if probs is None:
        probs = np.eye(len(labels))[[labels.index(y) for y in teacher_labels]]
    rows = [{"text": t, "label": y, "probs": [float(x) for x in p]} for t, y, p in zip(texts, teacher_labels, probs)]
    return peers.protege_static_retrained(task, rows)


def fit_tfidf(texts, teacher_labels, labels, probs=None):
    """TF-IDF word 1–2-grams + LR, C by CV — the settings of bench/peers.peer_tfidf, kept as a pipeline so it
    has predict_proba (peer_tfidf returns only a predict function)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline

    pipe = make_pipeline(TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2),
                         LogisticRegressionCV(Cs=[1, 10, 100], cv=5, max_iter=3000))
    pipe.fit(list(texts), list(teacher_labels))
    cols = [list(pipe.classes_).index(lab) if lab in pipe.classes_ else None for lab in labels]
    pipe.predict_proba_task = lambda xs: _reindex(pipe.predict_proba(list(xs)), cols)  # type: ignore[attr-defined]
    return _Wrapped(pipe.predict, pipe.predict_proba_task)


class _Wrapped:
    def __init__(self, predict, predict_proba):
        self._p, self._pp = predict, predict_proba

    def predict(self, texts):
        return list(self._p(list(texts)))

    def predict_proba(self, texts):
        return self._pp(list(texts))


_SHARED: dict[str, Any] = {}


def _m2v():
    if "m2v" not in _SHARED:
        _SHARED["m2v"] = peers.model2vec_model()
    return _SHARED["m2v"]


def fit_model2vec(texts, teacher_labels, labels, probs=None):
    m2v = _m2v()
    return _EmbedLR(lambda xs: m2v.encode(list(xs), use_multiprocessing=False), labels).fit(texts, teacher_labels)


def _minilm_frozen():
    if "minilm" not in _SHARED:
        _SHARED["minilm"] = peers.minilm()
        _SHARED["minilm_cache"] = {}
    return _SHARED["minilm"], _SHARED["minilm_cache"]


def fit_minilm_frozen(texts, teacher_labels, labels, probs=None):
    """Frozen all-MiniLM-L6-v2 sentence embeddings + LR. Training texts' embeddings are cached across budgets
    (the samples are nested); gold is encoded afresh at predict time, so timings are honest."""
    mini, cache = _minilm_frozen()
    enc = lambda xs: mini.encode(list(xs), batch_size=32, show_progress_bar=False)  # noqa: E731

    def enc_train(xs):
        todo = [x for x in dict.fromkeys(xs) if x not in cache]
        if todo:
            for x, e in zip(todo, enc(todo)):
                cache[x] = e
        return np.stack([cache[x] for x in xs])

    return _EmbedLR(enc, labels).fit(texts, teacher_labels, encode_train=enc_train)


def make_setfit(n_pairs: int):
    def fit_setfit(texts, teacher_labels, labels, probs=None):
        """SetFit-style: contrastive fine-tuning of a fresh all-MiniLM-L6-v2 on same/different-teacher-label
        pairs (bench/peers.setfit_finetune), then LR on the tuned embeddings."""
        m = peers.minilm()
        peers.setfit_finetune(m, list(texts), list(teacher_labels), min(n_pairs, 2 * len(texts)))
        return _EmbedLR(lambda xs: m.encode(list(xs), batch_size=32, show_progress_bar=False), labels).fit(
            texts, teacher_labels)

    return fit_setfit


def default_makers(setfit_pairs: int = 1000) -> list[Maker]:
    makers = [Maker("protege static (default)", fit_protege_static, note="reference for p-values"),
              Maker("TF-IDF + LR", fit_tfidf),
              Maker("model2vec + LR", fit_model2vec),
              Maker("MiniLM-L6 (frozen) + LR", fit_minilm_frozen, n_single=30, batch=64)]
    if setfit_pairs:
        makers.append(Maker("SetFit-style MiniLM-L6", make_setfit(setfit_pairs), n_single=30, batch=64,
                            note=f"{setfit_pairs} contrastive pairs max"))
    return makers


# -- the run -----------------------------------------------------------------------------------

def topk_renorm(P: np.ndarray, k: int = TOP_LOGPROBS) -> np.ndarray:
    """What protege's openai teacher recovers from top_logprobs=k: the k largest label probabilities, renormalised."""
    if P.shape[1] <= k:
        return P
    out = np.zeros_like(P)
    top = np.argsort(-P, axis=1, kind="stable")[:, :k]
    rows = np.arange(len(P))[:, None]
    out[rows, top] = P[rows, top]
    return out / out.sum(1, keepdims=True)


def score_row(task: str, budget: int, name: str, pred: Sequence[str], gold: Sequence[str], teacher_pred: Sequence[str],
              teacher_acc: float, ref_ok: np.ndarray | None, timing: dict, train_s: float | None, **extra) -> dict:
    ok = np.array([p == y for p, y in zip(pred, gold)], dtype=float)
    p = M.mcnemar_p(ref_ok, ok)[0] if ref_ok is not None else None
    acc = float(ok.mean())
    return {"task": task, "budget": budget, "model": name, "accuracy": acc, "ci": list(M.bootstrap_ci(ok)),
            "kept": acc / teacher_acc if teacher_acc else None,
            "agreement": float(np.mean([a == b for a, b in zip(pred, teacher_pred)])), "p_vs_ref": p,
            "ms_per_item": timing.get("ms_p50"), "items_per_s": timing.get("items_per_s"), "train_s": train_s,
            "_ok": ok, **extra}


def sample_order(task: SuiteTask, seed: int = 0) -> np.ndarray:
    """The pool's labelling order: budget b takes the first b (nested samples)."""
    return np.random.default_rng(seed).permutation(len(task.pool))


def run_task(task: SuiteTask, sim: SimulatedTeacher, budgets: list[int], makers: list[Maker], seed: int = 0,
             log=print) -> list[dict]:
    order = sample_order(task, seed)
    gx, gy = [g["text"] for g in task.gold], [g["label"] for g in task.gold]
    t_gold, _ = sim.label(gx)
    t_acc = float(np.mean([a == b for a, b in zip(t_gold, gy)]))
    rows = []
    for budget in sorted(set(min(b, len(task.pool)) for b in budgets)):
        sample = [task.pool[i]["text"] for i in order[:budget]]
        t_labels, t_probs = sim.label(sample)
        t_probs = topk_renorm(t_probs)
        log(f"[{task.name}] budget {budget}: teacher right on {np.mean([a == task.pool[i]['label'] for a, i in zip(t_labels, order)]):.3f} "
            f"of the sample, {t_acc:.3f} of gold")
        rows.append(score_row(task.name, budget, "teacher (simulated)", t_gold, gy, t_gold, t_acc, None, {}, None,
                              n_train=budget))
        ref_ok = None
        for mk in makers:
            t0 = time.perf_counter()
            try:
                model = mk.fit(sample, t_labels, task.labels, probs=t_probs)
            except Exception as e:  # one broken student must not sink the suite; the row says why
                log(f"  {mk.name}: FAILED {type(e).__name__}: {e}")
                rows.append({"task": task.name, "budget": budget, "model": mk.name, "error": f"{type(e).__name__}: {e}"})
                continue
            train_s = time.perf_counter() - t0
            pred, timing = peers.measure(model.predict, gx, n_single=mk.n_single, batch=mk.batch)
            r = score_row(task.name, budget, mk.name, pred, gy, t_gold, t_acc, ref_ok, timing, train_s, n_train=budget,
                          note=mk.note)
            if ref_ok is None:
                ref_ok = r["_ok"]
            rows.append(r)
            log(f"  {mk.name:28s} acc {r['accuracy']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]  kept {r['kept']:.2f}  "
                f"{_n(r['ms_per_item'], '.3g')} ms/item  train {train_s:.1f} s")
    return rows


def run_e2e(task: SuiteTask, sim: SimulatedTeacher, sample: list[str], ref_ok: np.ndarray | None, base_url: str,
            out: Path, log=print) -> dict:
    """``protege run`` on the task (inputs: ``sample``, the same texts the direct rows were trained on), in a
    subprocess, against the simulated teacher served over HTTP. The run folder (and its ledger) is removed
    first: a ledger kept from an earlier run would answer from a differently configured teacher."""
    import shutil

    from protege.data import read_jsonl, text_key

    budget = len(sample)
    folder = out / "e2e" / task.name
    shutil.rmtree(folder, ignore_errors=True)
    path = write_task_folder(task, folder / "task", base_url=base_url, inputs=sample)
    exe = Path(sys.executable).with_name("protege")
    cmd = [str(exe) if exe.exists() else "protege", "run", str(path), "--out", str(folder / "run"), "--force"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SUITE_TEACHER_KEY": "unused"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        log(f"[e2e {task.name}] protege run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        return {"task": task.name, "budget": budget, "model": "protege run (CLI, HTTP teacher)",
                "error": proc.stderr[-2000:]}
    rep = json.loads((folder / "run" / "report.json").read_text())
    items = {r["id"]: r for p in sorted((folder / "run").rglob("items.jsonl")) for r in read_jsonl(p)}
    gold_ids = [text_key(g["text"]) for g in task.gold]
    ok = np.array([items[i]["student_score"] for i in gold_ids], dtype=float) if all(i in items for i in gold_ids) else None
    s, t = rep["student"], rep["teacher"]
    row = {"task": task.name, "budget": budget, "model": "protege run (CLI, HTTP teacher)", "accuracy": s["score"],
           "ci": s["score_ci"], "kept": rep.get("retained"), "agreement": s.get("agreement"),
           "p_vs_ref": M.mcnemar_p(ref_ok, ok)[0] if ok is not None and ref_ok is not None and len(ok) == len(ref_ok) else None,
           "ms_per_item": s.get("ms_per_item"), "items_per_s": None, "train_s": None, "n_train": budget,
           "teacher_score_over_http": t["score"], "n_eval": rep.get("n_eval"), "wall_s": wall,
           "teacher_calls": None, "note": f"generate+curate+train+evaluate in {wall:.0f} s; teacher {t['score']:.3f} over HTTP"}
    log(f"[e2e {task.name}] protege run: student {s['score']:.3f}, teacher over HTTP {t['score']:.3f} "
        f"(direct {sim.accuracy(task.gold):.3f}), retained {rep.get('retained')}, {wall:.0f} s")
    return row


def run_suite(task_names: list[str], budgets: list[int], *, makers: list[Maker] | None = None, e2e: str | None = None,
              error_rate: float = 0.10, seed: int = 0, out: Path = Path("runs/suite"), log=print) -> dict:
    makers = makers if makers is not None else default_makers()
    out.mkdir(parents=True, exist_ok=True)
    task_info, rows, e2e_row = [], [], None
    for name in task_names:
        try:
            task = load_task(name)
        except MissingData as e:
            log(f"[{name}] skipped: {e}")
            task_info.append({"task": name, "skipped": str(e)})
            continue
        t0 = time.perf_counter()
        sim = SimulatedTeacher.for_task(task, error_rate=error_rate, seed=seed, cache_dir=out / "cache")
        es = sim.error_structure()
        info = {**task.stats(), "teacher_gold_accuracy": sim.accuracy(task.gold), "teacher": es,
                "teacher_setup_s": time.perf_counter() - t0, "notes": task.notes}
        task_info.append(info)
        log(f"[{name}] {info['n_pool']} pool / {info['n_gold']} gold, {info['n_labels']} labels; simulated teacher "
            f"{info['teacher_gold_accuracy']:.3f} on gold (errors: {es['error_rate']:.3f} overall, "
            f"{es['error_rate_hardest_quarter']:.3f} on the hardest quarter)")
        task_rows = run_task(task, sim, budgets, makers, seed=seed, log=log)
        rows += task_rows
        if e2e == name:
            budget = min(min(budgets), len(task.pool))
            sample = [task.pool[i]["text"] for i in sample_order(task, seed)[:budget]]
            ref = next((r["_ok"] for r in task_rows if r.get("budget") == budget and r.get("model") == makers[0].name
                        and "_ok" in r), None)
            base_url, stop = serve({name: sim})
            try:
                e2e_row = run_e2e(task, sim, sample, ref, base_url, out, log=log)
            finally:
                stop()
            rows.append(e2e_row)
    for r in rows:
        r.pop("_ok", None)
    import torch

    return {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": {"cpu": peers._cpu(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "load_avg_1m": os.getloadavg()[0]},
            "settings": {"tasks": task_names, "budgets": budgets, "error_rate": error_rate, "seed": seed,
                         "makers": [m.name for m in makers], "reference": makers[0].name if makers else None,
                         "teacher_labels": "direct (SimulatedTeacher.label, top-20 renormalised) except the e2e row",
                         "e2e": e2e},
            "tasks": task_info, "rows": rows}


# -- output ------------------------------------------------------------------------------------

def _n(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"Measured {res['date']} on {m['cpu']} ({m['cores']} cores, torch {m['torch_threads']} thread(s), "
             f"load {m['load_avg_1m']:.1f}); simulated teacher error rate {res['settings']['error_rate']}; "
             f"p-values: paired McNemar vs {res['settings']['reference']}.", "",
             "| task | source | n pool / gold | labels | median len | pool minority share | teacher on gold |",
             "|---|---|---|---|---|---|---|"]
    for t in res["tasks"]:
        if "skipped" in t:
            lines.append(f"| {t['task']} | skipped: {t['skipped']} | | | | | |")
            continue
        lines.append(f"| {t['task']} | {t['source'].split(':')[0]} | {t['n_pool']} / {t['n_gold']} | {t['n_labels']} | "
                     f"{t['median_len']:g} {t['len_unit']} | {t['minority_share']:.3f} ({t['minority_label']}) | "
                     f"{t['teacher_gold_accuracy']:.3f} |")
    lines += ["", "| task | labels bought | model | accuracy [95% CI] | kept of teacher | agreement | p vs ref | "
              "ms/item (p50) | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['task']} | {r['budget']} | {r['model']} | failed: {r['error'][:80]} | | | | | |")
            continue
        lines.append(f"| {r['task']} | {r['budget']} | {r['model']} | {r['accuracy']:.3f} [{r['ci'][0]:.3f}, "
                     f"{r['ci'][1]:.3f}] | {_n(r['kept'], '.2f')} | {_n(r['agreement'], '.3f')} | "
                     f"{_n(r['p_vs_ref'], '.2g')} | {_n(r['ms_per_item'], '.3g')} | {_n(r['train_s'], '.1f')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short-text tasks, budget 1,000, SetFit 256 pairs (<= 10 min)")
    ap.add_argument("--tasks", default=None, help=f"comma-separated, from: {', '.join(TASKS)}")
    ap.add_argument("--budgets", default=None, help="teacher labels per run (default 1000,4000,16000; quick: 1000)")
    ap.add_argument("--error-rate", type=float, default=0.10)
    ap.add_argument("--setfit-pairs", type=int, default=None, help="0 skips SetFit (default 1000; quick: 256)")
    ap.add_argument("--e2e", default=None, help="the task run end to end through `protege run` (default: the first; "
                                                 "'none' to skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: each model on one core, as a serving worker)")
    ap.add_argument("--out", default="runs/suite", help="caches and the e2e run")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    names = a.tasks.split(",") if a.tasks else (QUICK_TASKS if a.quick else list(TASKS))
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        ap.error(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    budgets = [int(b) for b in a.budgets.split(",")] if a.budgets else ([1000] if a.quick else [1000, 4000, 16000])
    pairs = a.setfit_pairs if a.setfit_pairs is not None else (256 if a.quick else 1000)
    e2e = None if a.e2e == "none" else (a.e2e or names[0])
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    res = run_suite(names, budgets, makers=default_makers(pairs), e2e=e2e, error_rate=a.error_rate, seed=a.seed,
                    out=Path(a.out), log=log)
    res["wall_s"] = time.perf_counter() - t0
    print(markdown(res))
    print(f"wall {res['wall_s']:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, ensure_ascii=False))
    return res


if __name__ == "__main__":
    main()

"""The task suite: per task and label budget, students trained on the same simulated-teacher labels, scored
on the same held-out gold items.

    python bench/suite/run.py [--quick] [--tasks a,b] [--budgets 1000,4000,16000] [--json out.json]

For every task (bench/suite/tasks.py) a simulated strong teacher (bench/suite/teacher.py: ~10% wrong, with
errors on hard items and confusable label pairs) labels a seeded random sample of the pool, one sample per
budget (nested: the 1k sample is the start of the 4k one; a budget above the pool size means "all of it").
Every student maker then fits on those teacher labels and is scored on gold: accuracy with a 95% bootstrap
CI, agreement with the teacher on gold, the share of the teacher's gold accuracy it keeps, a paired
McNemar p-value against the reference student (the first maker: protege's default, ``student.kind: auto``,
trained through ``protege.stages.train.auto.train_auto``), ms/item one
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
building blocks. To add a student, append a ``Maker`` — or pass ``makers=`` to :func:`run_suite`; the first
maker is the reference for the p-values.

``--json`` is rewritten after every task and budget; :func:`markdown` renders the tables from that JSON
(``--render a.json,b.json [--readme]`` merges result files, prints, and writes bench/suite/README.md).

``--quick`` (≤ 10 min on 2 busy cores): the five short-text tasks, budget 1,000, SetFit with 256 pairs.

Every auto ladder (and the e2e row's task file) runs with ``student.time_budget_s`` = ``--ladder-budget`` (300 s)
and ``student.rungs`` = ``--rungs`` (static, frozen, static-distilled: the fine-tuned encoder fits 300 s on two
cores only at the smallest budgets; ``--rungs all`` puts it back). Each row records ``cpu_s``, the CPU seconds
its fit and scoring cost in its process, so the suite's time can be read whatever ran beside it.
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
    needs_task: bool = False  # fit(..., suite_task=SuiteTask, out=Path): the auto student writes a task folder


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


class _AutoModel:
    """The ladder's winner (a normal protege student) plus what the ladder said, for the suite's row."""

    def __init__(self, winner, stats: dict):
        self.winner, self.stats = winner, stats
        lad = stats["ladder"]
        chosen = next(r for r in lad["rungs"] if r["name"] == lad["chosen"])
        self.suite_extra = {
            "auto_rung": lad["chosen"], "auto_cv_agreement": chosen["cv_agreement"], "auto_cv_ci": chosen["cv_ci"],
            "auto_ms_ladder": chosen["ms_p50"], "auto_why": lad["why"], "auto_folds": lad["folds"],
            "auto_params": chosen["params"], "auto_n_pool": stats.get("n_pool"),
            "ladder": [{k: r.get(k) for k in ("name", "params", "cv_agreement", "cv_ci", "ms_p50", "eligible",
                                              "size_bytes", "train_s", "error", "n_pseudo_labelled")}
                       for r in lad["rungs"]]}

    def predict(self, texts):
        return list(self.winner.predict(list(texts)))

    def predict_proba(self, texts):
        return self.winner.predict_proba(list(texts))


LADDER_BUDGET_S: dict[str, float | None] = {"s": None}  # None: the task file's student.time_budget_s (default 1200)
# The rungs the suite's ladders try (--rungs; None: the task file's, i.e. all four). The default leaves out the
# fine-tuned encoder: on 2 cores it fits a 300-s ladder only below ~1.5k labels (never at a task's largest budget),
# where it cost ~150 CPU-s per unit and won once in seven (full-s5: rt-polarity 1k, CV 0.805 vs 0.785).
SUITE_RUNGS = ["static", "frozen", "static-distilled"]
LADDER_RUNGS: dict[str, list[str] | None] = {"r": list(SUITE_RUNGS)}


def ladder_student_settings() -> dict:
    """The ``student`` keys the suite sets on every auto ladder (and on the e2e row's task file)."""
    out: dict = {}
    if LADDER_BUDGET_S.get("s") is not None:
        out["time_budget_s"] = LADDER_BUDGET_S["s"]
    if LADDER_RUNGS.get("r"):
        out["rungs"] = list(LADDER_RUNGS["r"])
    return out


def fit_protege_auto(texts, teacher_labels, labels, probs=None, *, suite_task=None, out: Path = Path("runs/suite")):
    """protege's ``student.kind: auto`` (the ladder), through protege's own train path: the task folder a user
    would write (bench/suite/tasks.write_task_folder: ``data.inputs`` = the whole pool, gold = the gold file;
    every ``student`` / ``train`` key at its default), loaded with ``protege.task.load_task``, and
    ``protege.stages.train.auto.train_auto`` — the function the train stage calls for ``kind: auto`` — on
    curated-style rows of the teacher's labels (source teacher, weight 1). ``unlabelled_pool`` reads
    ``data.inputs`` minus gold, as in ``protege run``; the teacher in the file is never called."""
    import tempfile

    from protege.stages.train.auto import train_auto
    from protege.task import load_task as load_spec

    folder = out / "auto" / suite_task.name
    path = folder / "task" / "task.yaml"
    if not path.exists():
        write_task_folder(suite_task, folder / "task", base_url="http://127.0.0.1:9/v1",
                          inputs=[r["text"] for r in suite_task.pool])
    spec = load_spec(path)
    assert spec.student.kind == "auto", spec.student.kind
    if st := ladder_student_settings():  # --ladder-budget / --rungs: the suite's 18 ladders in 45 min, not 18 x 20
        spec.student = spec.student.model_copy(update=st)
    if probs is None:
        probs = np.eye(len(labels))[[labels.index(y) for y in teacher_labels]]
    rows = [{"text": t, "label": y, "probs": [float(x) for x in p], "source": "teacher", "weight": 1.0}
            for t, y, p in zip(texts, teacher_labels, probs)]
    with tempfile.TemporaryDirectory(prefix="suite-auto-") as tmp:
        winner, stats = train_auto(spec, Path(tmp), rows)
    return _AutoModel(winner, stats)


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


EMBED_CACHE: dict[str, Path | None] = {"dir": None}  # run_suite sets <out>/cache/minilm-frozen


def _minilm_frozen():
    if "minilm" not in _SHARED:
        _SHARED["minilm"] = peers.minilm()
        _SHARED["minilm_cache"], _SHARED["minilm_shards"] = {}, set()
    return _SHARED["minilm"], _SHARED["minilm_cache"], _SHARED["minilm_shards"]


def _text_key(t: str) -> str:
    import hashlib

    return hashlib.sha1(t.encode("utf-8")).hexdigest()[:20]


def _disk_cache_load(cache: dict, seen: set) -> None:
    """Fill ``cache`` (text key -> embedding) from every shard under EMBED_CACHE (other units' too) not in
    ``seen`` (the shard names already read), and add them there."""
    d = EMBED_CACHE["dir"]
    for f in sorted(d.glob("*.npz")) if d is not None and d.is_dir() else ():
        if f.name in seen:
            continue
        with np.load(f) as z:
            cache.update(zip(z["keys"].tolist(), z["emb"]))
        seen.add(f.name)


def _disk_cache_save(keys: list[str], emb: np.ndarray) -> None:
    """One new shard per call, written whole then renamed: units of one task running at once never clash."""
    d = EMBED_CACHE["dir"]
    if d is None or not keys:
        return
    d.mkdir(parents=True, exist_ok=True)
    f = d / f"{os.getpid()}-{time.time_ns()}.npz"
    tmp = f.with_suffix(".tmp.npz")
    np.savez(tmp, keys=np.array(keys), emb=np.asarray(emb, dtype=np.float32))
    os.replace(tmp, f)


def fit_minilm_frozen(texts, teacher_labels, labels, probs=None):
    """Frozen all-MiniLM-L6-v2 sentence embeddings + LR. Training texts' embeddings are cached across budgets,
    on disk (the samples are nested: a task's 1k and 4k units reuse what its largest unit encoded; units run as
    separate processes), so ``train_s`` leaves out encoding texts another unit already encoded; gold is encoded
    afresh at predict time, so timings are honest."""
    mini, cache, shards = _minilm_frozen()
    enc = lambda xs: mini.encode(list(xs), batch_size=32, show_progress_bar=False)  # noqa: E731

    def enc_train(xs):
        _disk_cache_load(cache, shards)
        keys = [_text_key(x) for x in xs]
        todo = list(dict.fromkeys(x for x, k in zip(xs, keys) if k not in cache))
        if todo:
            E = enc(todo)
            new = [_text_key(x) for x in todo]
            cache.update(zip(new, E))
            _disk_cache_save(new, E)
        return np.stack([cache[k] for k in keys])

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


AUTO = "protege auto (ladder)"


def default_makers(setfit_pairs: int = 1000, static: bool = True) -> list[Maker]:
    makers = [Maker(AUTO, fit_protege_auto, n_single=50, needs_task=True,
                    note="student.kind: auto (default); reference for p-values" + (
                        f"; student.time_budget_s {LADDER_BUDGET_S['s']:.0f}" if LADDER_BUDGET_S["s"] else "") + (
                        f"; student.rungs {','.join(LADDER_RUNGS['r'])}" if LADDER_RUNGS.get("r") else ""))]
    if static:
        makers.append(Maker("protege static", fit_protege_static, note="student.kind: static (the old default)"))
    makers += [
              Maker("TF-IDF + LR", fit_tfidf),
              Maker("model2vec + LR", fit_model2vec),
              Maker("MiniLM-L6 (frozen) + LR", fit_minilm_frozen, n_single=30, batch=64,
                    note="training-text embeddings cached across units (nested samples): train_s leaves them out")]
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
             log=print, out: Path = Path("runs/suite"), on_budget=None) -> list[dict]:
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
            t0, c0 = time.perf_counter(), _self_cpu_s()
            try:
                kw = {"suite_task": task, "out": out} if mk.needs_task else {}
                model = mk.fit(sample, t_labels, task.labels, probs=t_probs, **kw)
            except Exception as e:  # one broken student must not sink the suite; the row says why
                log(f"  {mk.name}: FAILED {type(e).__name__}: {e}")
                rows.append({"task": task.name, "budget": budget, "model": mk.name, "error": f"{type(e).__name__}: {e}"})
                continue
            train_s = time.perf_counter() - t0
            pred, timing = peers.measure(model.predict, gx, n_single=mk.n_single, batch=mk.batch)
            r = score_row(task.name, budget, mk.name, pred, gy, t_gold, t_acc, ref_ok, timing, train_s, n_train=budget,
                          note=mk.note, cpu_s=_self_cpu_s() - c0, **getattr(model, "suite_extra", {}))
            if ref_ok is None:
                ref_ok = r["_ok"]
            rows.append(r)
            log(f"  {mk.name:28s} acc {r['accuracy']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]  kept {r['kept']:.2f}  "
                f"{_n(r['ms_per_item'], '.3g')} ms/item  train {train_s:.1f} s"
                + (f"  rung {r['auto_rung']} (CV {r['auto_cv_agreement']:.3f})" if "auto_rung" in r else ""))
        if on_budget is not None:
            on_budget(rows)
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
    st = ladder_student_settings()  # --ladder-budget / --rungs reach this row too: its ladder runs as the others do
    path = write_task_folder(task, folder / "task", base_url=base_url, inputs=sample,
                             extra={"student": st} if st else None)
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


def _versions() -> dict:
    """The code the rows ran: HEAD, the last commit touching protege/students/, and whether that tree is dirty."""
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:  # noqa: BLE001
            return None

    return {"head": git("rev-parse", "--short", "HEAD"),
            "students": git("log", "-1", "--format=%h %s", "--", "protege/students/"),
            "students_dirty": bool(git("status", "--porcelain", "--", "protege/students/"))}


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and its finished children: on a shared machine, what the run
    costs regardless of how many other processes competed for the cores."""
    import resource

    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return _self_cpu_s() + b.ru_utime + b.ru_stime


def _self_cpu_s() -> float:
    """CPU seconds of this process (all its threads): a row's ``cpu_s`` is what fitting and scoring that student
    cost, whatever else ran beside it (the suite's 45-minute budget is counted in these)."""
    import resource

    a = resource.getrusage(resource.RUSAGE_SELF)
    return a.ru_utime + a.ru_stime


def _strip(rows: list[dict]) -> list[dict]:
    """Rows for the JSON: the per-gold-item correctness as a string of 0/1 (``ok_bits``), so that a merge of runs
    can recompute the paired p-values against whichever reference row it ends up with."""
    return [{**{k: v for k, v in r.items() if k != "_ok"},
             **({"ok_bits": "".join("1" if x else "0" for x in r["_ok"])} if "_ok" in r else {})} for r in rows]


def run_suite(task_names: list[str], budgets: list[int], *, makers: list[Maker] | None = None, e2e: str | None = None,
              error_rate: float = 0.10, seed: int = 0, out: Path = Path("runs/suite"), log=print,
              save=None) -> dict:
    """``save(res)`` (if given) is called with the results so far after every task and budget."""
    import torch

    import protege.stages.train.auto  # noqa: F401  import protege's students now, so `code` names what runs
    import protege.students.rungs  # noqa: F401

    makers = makers if makers is not None else default_makers()
    out.mkdir(parents=True, exist_ok=True)
    EMBED_CACHE["dir"] = out / "cache" / "minilm-frozen"
    task_info, rows, e2e_row = [], [], None
    t_start = time.perf_counter()
    code = _versions()  # the protege code this process imported (a commit landing later does not change it)

    def result(extra_rows=()) -> dict:
        return {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": {"cpu": peers._cpu(), "cores": os.cpu_count(),
                "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                "load_avg_1m": os.getloadavg()[0]},
                "code": code,
                "settings": {"tasks": task_names, "budgets": budgets, "error_rate": error_rate, "seed": seed,
                             "makers": [m.name for m in makers], "reference": makers[0].name if makers else None,
                             "maker_notes": {m.name: m.note for m in makers},
                             "teacher_labels": "direct (SimulatedTeacher.label, top-20 renormalised) except the e2e row",
                             "e2e": e2e},
                "tasks": task_info, "rows": _strip(list(rows) + list(extra_rows)),
                "wall_s": time.perf_counter() - t_start, "cpu_s": _cpu_s()}

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
                "teacher_setup_s": time.perf_counter() - t0, "notes": task.notes, "code": code}
        task_info.append(info)
        log(f"[{name}] {info['n_pool']} pool / {info['n_gold']} gold, {info['n_labels']} labels; simulated teacher "
            f"{info['teacher_gold_accuracy']:.3f} on gold (errors: {es['error_rate']:.3f} overall, "
            f"{es['error_rate_hardest_quarter']:.3f} on the hardest quarter)")
        task_rows = run_task(task, sim, budgets, makers, seed=seed, log=log, out=out,
                             on_budget=(lambda rs: save(result(rs))) if save else None)
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
        if save:
            save(result())
    return result()


# -- output ------------------------------------------------------------------------------------

def _n(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


PEERS = ("TF-IDF + LR", "model2vec + LR", "MiniLM-L6 (frozen) + LR", "SetFit-style MiniLM-L6")


def merge(results: list[dict]) -> dict:
    """Several result JSONs (e.g. one per process, or a re-run of one student with ``--only-auto``) as one: a later
    file's row for a (task, budget, model) replaces an earlier one, its task line replaces the earlier one; where
    rows carry ``ok_bits``, p-values are recomputed against the merged reference row."""
    out = {**results[0], "tasks": [], "rows": []}
    tasks: dict[str, dict] = {}
    rows: dict[tuple, dict[str, dict]] = {}
    for res in results:
        for t in res["tasks"]:
            tasks[t["task"]] = {**t, "_date": res["date"], "_code": t.get("code") or res.get("code")}
        for r in res["rows"]:
            rows.setdefault((r["task"], r["budget"]), {})[r["model"]] = {**r, "_code": res.get("code")}
    ref = results[-1]["settings"].get("reference")
    for group in rows.values():
        bits = (group.get(ref) or {}).get("ok_bits")
        if not bits:
            continue
        ref_ok = np.array([c == "1" for c in bits], dtype=float)
        for r in group.values():
            if r["model"] != ref and not r["model"].startswith("teacher") and r.get("ok_bits") and \
                    len(r["ok_bits"]) == len(bits):
                r["p_vs_ref"] = M.mcnemar_p(ref_ok, np.array([c == "1" for c in r["ok_bits"]], dtype=float))[0]
    order = {t: k for k, t in enumerate(tasks)}
    out["tasks"] = list(tasks.values())
    out["rows"] = [r for key in sorted(rows, key=lambda k: (order.get(k[0], 99), k[1])) for r in rows[key].values()]
    out["sources"] = [{"date": r["date"], "wall_s": r.get("wall_s"), "cpu_s": r.get("cpu_s"), "load_avg_1m": r["machine"]["load_avg_1m"],
                       "tasks": sorted({t["task"] for t in r["tasks"]}), "code": r.get("code")} for r in results]
    out["wall_s"] = sum(r.get("wall_s") or 0 for r in results)
    out["cpu_s"] = sum(r.get("cpu_s") or 0 for r in results)
    return out


def verdicts(res: dict) -> list[dict]:
    """Per task, at its largest budget: does auto keep >= 95% of the teacher and is it not significantly worse
    than the best peer (paired McNemar p >= 0.05, or auto at least as accurate)?"""
    out = []
    for t in res["tasks"]:
        rows = [r for r in res["rows"] if r["task"] == t["task"] and "error" not in r]
        if not rows:
            continue
        b = max(r["budget"] for r in rows)
        at = {r["model"]: r for r in rows if r["budget"] == b}
        auto = at.get(res["settings"]["reference"])
        peers_ = [at[m] for m in PEERS if m in at]
        if auto is None or not peers_:
            continue
        best = max(peers_, key=lambda r: r["accuracy"])
        kept_ok = auto["kept"] >= 0.95
        peer_ok = auto["accuracy"] >= best["accuracy"] or (best["p_vs_ref"] is not None and best["p_vs_ref"] >= 0.05)
        out.append({"task": t["task"], "budget": b, "teacher": auto["accuracy"] / auto["kept"], "auto": auto["accuracy"],
                    "rung": auto.get("auto_rung"), "kept": auto["kept"], "best_peer": best["model"],
                    "best_peer_acc": best["accuracy"], "p": best["p_vs_ref"], "kept_ok": kept_ok, "peer_ok": peer_ok,
                    "kept_short": max(0.0, 0.95 - auto["kept"]),
                    "peer_gap": best["accuracy"] - auto["accuracy"]})
    return out


def markdown(res: dict, budgets: Sequence[int] | None = None) -> str:
    """The suite's tables from its JSON (``run_suite``'s result, or :func:`merge` of several): tasks, the
    done-when verdict per task at its largest budget, and every row (``budgets``: only those)."""
    m = res["machine"]
    ref = res["settings"]["reference"]
    src = res.get("sources") or [{"date": res["date"], "wall_s": res.get("wall_s"), "cpu_s": res.get("cpu_s"), "load_avg_1m": m["load_avg_1m"],
                                  "code": res.get("code")}]
    runs = "; ".join(f"{s['date']} ({_n(s.get('wall_s'), '.0f')} s wall, {_n(s.get('cpu_s'), '.0f')} s CPU, load {s['load_avg_1m']:.1f})" for s in src)
    notes = res["settings"].get("maker_notes") or {}
    lines = [f"Measured on {m['cpu']} ({m['cores']} cores, torch {m['torch_threads']} thread(s), BLAS 1 thread): {runs}. "
             f"Simulated teacher error rate {res['settings']['error_rate']}; p-values: paired McNemar vs {ref}. "
             + " ".join(f"{k}: {v}." for k, v in notes.items() if v and k != ref), "",
             "| task | source | n pool / gold | labels | median len | pool minority share | teacher on gold | students code |",
             "|---|---|---|---|---|---|---|---|"]
    for t in res["tasks"]:
        if "skipped" in t:
            lines.append(f"| {t['task']} | skipped: {t['skipped']} | | | | | | |")
            continue
        code = t.get("_code") or t.get("code") or {}
        cv = code.get("students_label") or ((code.get("students") or "").split(" ")[0]
                                            + (" + uncommitted" if code.get("students_dirty") else ""))
        lines.append(f"| {t['task']} | {t['source'].split(':')[0]} | {t['n_pool']} / {t['n_gold']} | {t['n_labels']} | "
                     f"{t['median_len']:g} {t['len_unit']} | {t['minority_share']:.3f} ({t['minority_label']}) | "
                     f"{t['teacher_gold_accuracy']:.3f} | {cv or '—'} |")
    v = verdicts(res)
    if v:
        lines += ["", "Done-when check, largest budget of each task (goal: kept >= 0.95 of the teacher, and not "
                  "significantly worse than the best peer: p >= 0.05 or ahead of it):", "",
                  "| task | labels | teacher | auto (rung) | kept | best peer | peer acc | p auto vs peer | goal |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for x in v:
            miss = []
            if not x["kept_ok"]:
                miss.append(f"kept {x['kept']:.3f} < 0.95 (short {x['kept_short']:.3f})")
            if not x["peer_ok"]:
                miss.append(f"{x['peer_gap'] * 100:.1f} points behind {x['best_peer']}, p = {x['p']:.2g}")
            lines.append(f"| {x['task']} | {x['budget']} | {x['teacher']:.3f} | {x['auto']:.3f} ({x['rung']}) | "
                         f"{x['kept']:.3f} | {x['best_peer']} | {x['best_peer_acc']:.3f} | {_n(x['p'], '.2g')} | "
                         f"{'meets' if not miss else 'misses: ' + '; '.join(miss)} |")
    lines += ["", "| task | labels bought | model | accuracy [95% CI] | kept of teacher | agreement | p vs auto | "
              "ms/item (p50) | train s | auto: rung (CV agreement, ladder ms) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if budgets and r["budget"] not in budgets and r["budget"] != max(
                x["budget"] for x in res["rows"] if x["task"] == r["task"]):
            continue
        if "error" in r:
            lines.append(f"| {r['task']} | {r['budget']} | {r['model']} | failed: {r['error'][:80]} | | | | | | |")
            continue
        rung = (f"{r['auto_rung']} ({r['auto_cv_agreement']:.3f}, {_n(r.get('auto_ms_ladder'), '.2f')} ms)"
                if r.get("auto_rung") else "")
        name = f"**{r['model']}**" if r["model"] == ref else r["model"]
        lines.append(f"| {r['task']} | {r['budget']} | {name} | {r['accuracy']:.3f} [{r['ci'][0]:.3f}, "
                     f"{r['ci'][1]:.3f}] | {_n(r['kept'], '.2f')} | {_n(r['agreement'], '.3f')} | "
                     f"{_n(r['p_vs_ref'], '.2g')} | {_n(r['ms_per_item'], '.3g')} | {_n(r['train_s'], '.1f')} | {rung} |")
    lines += ladder_table(res["rows"])
    return "\n".join(lines) + "\n"


def ladder_table(rows: list[dict]) -> list[str]:
    """Every rung of every auto ladder: CV agreement with the teacher (teacher-labelled held-out folds, never
    gold), single-item ms on one thread, training seconds — or why it did not run; the chosen one in bold."""
    ladders = [r for r in rows if r.get("ladder")]
    names = list(dict.fromkeys(x["name"] for r in ladders for x in r["ladder"]))
    if not ladders:
        return []
    out = ["", "The ladders (per rung: CV agreement with the teacher, ms per item on one thread, training s; "
           "chosen in bold):", "", "| task | labels bought | " + " | ".join(names) + " |",
           "|---|---|" + "---|" * len(names)]
    for r in ladders:
        by = {x["name"]: x for x in r["ladder"]}
        cells = []
        for n in names:
            x = by.get(n)
            if x is None:
                cells.append("not in the ladder")
            elif x.get("cv_agreement") is None:
                cells.append("skipped" if not x.get("error") else f"failed: {x['error'][:40]}")
            else:
                c = f"{x['cv_agreement']:.3f}, {_n(x.get('ms_p50'), '.2f')} ms, {_n(x.get('train_s'), '.0f')} s"
                cells.append(f"**{c}**" if n == r.get("auto_rung") else c)
        out.append(f"| {r['task']} | {r['budget']} | " + " | ".join(cells) + " |")
    return out


README_START, README_END = "<!-- suite-table:start -->", "<!-- suite-table:end -->"


def write_readme(res: dict, path: Path = HERE / "README.md") -> None:
    """Replace the README's generated block (between the two markers) with :func:`markdown` of ``res``."""
    text = path.read_text(encoding="utf-8")
    a, b = text.index(README_START) + len(README_START), text.index(README_END)
    path.write_text(text[:a] + "\n" + markdown(res) + text[b:], encoding="utf-8")


def plan_units(names: list[str], budgets: list[int]) -> list[tuple[str, int]]:
    """Every (task, effective budget) the suite trains, most expensive first: a budget past the pool is the whole
    pool (so 4k and 16k on a 3.9k pool are one unit), and the cost estimate is the labels plus a fixed 1,000 (the
    ladder's CV, the peers' fits and the static-distilled rung scale with the labels; every unit pays for its
    gold scoring and start-up)."""
    units = []
    for n in names:
        try:
            pool = load_task(n).stats()["n_pool"]
        except MissingData:
            units.append((n, min(budgets)))  # the child records the skip
            continue
        units += [(n, b) for b in sorted({min(b, pool) for b in budgets})]
    return sorted(units, key=lambda u: -(u[1] + 1000))


def run_jobs(names: list[str], budgets: list[int], a, argv: list[str], e2e: str | None) -> dict:
    """Run the suite as child processes of this script, one per (task, budget) unit (:func:`plan_units`), at most
    ``a.jobs`` at once, the longest first, the next one started as soon as one ends — the processes finish
    within about one unit of each other whatever the tasks' sizes — and merge their JSONs. Wall and CPU seconds
    of the whole are recorded, and each process's CPU seconds are in its part."""
    import resource

    drop = {"--jobs", "--tasks", "--json", "--readme", "--e2e", "--budgets"}
    base, skip = [], False
    for x in argv:
        if skip:
            skip = False
            continue
        key = x.split("=", 1)[0]
        if key in drop:
            skip = "=" not in x and key != "--readme"
            continue
        base.append(x)
    units = plan_units(names, budgets)
    out = Path(a.json).with_suffix("") if a.json else Path(a.out) / "jobs"
    t0 = time.perf_counter()
    running: list[tuple[subprocess.Popen, tuple[str, int]]] = []
    files, failed = [], []
    queue = list(units)
    while queue or running:
        while queue and len(running) < a.jobs:
            task, budget = queue.pop(0)
            f = Path(f"{out}.{task}.{budget}.json")
            files.append(f)
            cmd = [sys.executable, str(Path(__file__).resolve()), *base, "--tasks", task, "--budgets", str(budget),
                   "--json", str(f), "--e2e", e2e if e2e == task and budget == min(b for t, b in units if t == task)
                   else "none"]  # the e2e run uses the smallest budget (run_suite)
            running.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL), (task, budget)))
        time.sleep(0.5)
        for proc, unit in list(running):
            if proc.poll() is not None:
                running.remove((proc, unit))
                if proc.returncode:
                    failed.append(unit)
    if failed:
        print(f"suite: units failed: {failed}; merging what finished", file=sys.stderr)
    res = merge([json.loads(f.read_text()) for f in files if f.exists()])
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    res.update(wall_s=time.perf_counter() - t0, cpu_s=ru.ru_utime + ru.ru_stime, jobs=a.jobs, units=len(units))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, ensure_ascii=False))
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short-text tasks, budget 1,000, SetFit 256 pairs (<= 10 min)")
    ap.add_argument("--tasks", default=None, help=f"comma-separated, from: {', '.join(TASKS)}")
    ap.add_argument("--budgets", default=None, help="teacher labels per run (default 1000,4000,16000; quick: 1000)")
    ap.add_argument("--error-rate", type=float, default=0.10)
    ap.add_argument("--setfit-pairs", type=int, default=None, help="0 skips SetFit (default 1000; quick: 256)")
    ap.add_argument("--no-static", action="store_true", help="skip the protege static row (auto's static rung stays)")
    ap.add_argument("--e2e", default=None, help="the task run end to end through `protege run` (default: the first; "
                                                 "'none' to skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: each model on one core, as a serving worker)")
    ap.add_argument("--out", default="runs/suite", help="caches and the e2e run")
    ap.add_argument("--json", default=None, help="write the results here (after every task and budget)")
    ap.add_argument("--render", default=None, help="no run: print the tables of these result JSONs (comma-separated, "
                                                    "later files replace earlier ones' task/budget rows)")
    ap.add_argument("--readme", action="store_true", help="also write the tables into bench/suite/README.md")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only-auto", action="store_true", help="train only protege's auto student (no peers): re-measure "
                                                               "the ladder; render with --render beside a run that has the peers")
    ap.add_argument("--ladder-budget", type=float, default=300.0,
                    help="student.time_budget_s for every auto ladder, seconds (default 300: the whole suite fits "
                         "45 min on 2 cores; a user's default is 1200, which lets the fine-tuned encoder rung in "
                         "on small pools); 0: the task file's")
    ap.add_argument("--rungs", default=",".join(SUITE_RUNGS),
                    help="student.rungs for every auto ladder (default: all but the fine-tuned encoder, which fits "
                         "the suite's ladder budget only at the smallest label budgets); 'all': the task file's four")
    ap.add_argument("--jobs", type=int, default=1, help="run (task, budget) units as this many processes at once "
                                                        "(each on --threads threads), results merged; 2 uses both cores")
    a = ap.parse_args(argv)
    LADDER_BUDGET_S["s"] = a.ladder_budget or None
    LADDER_RUNGS["r"] = None if a.rungs == "all" else [r.strip() for r in a.rungs.split(",") if r.strip()]
    if a.render:
        files = [Path(f) for f in a.render.split(",")]
        for f in files:
            if not f.exists():
                print(f"{f}: not there (yet); left out", file=sys.stderr)
        res = merge([json.loads(f.read_text()) for f in files if f.exists()])
        print(markdown(res))
        if a.readme:
            write_readme(res)
        return res
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
    if a.jobs > 1 and (len(names) > 1 or len(budgets) > 1):
        res = run_jobs(names, budgets, a, argv if argv is not None else sys.argv[1:], e2e)
        print(markdown(res))
        print(f"wall {res['wall_s']:.0f} s, CPU {res['cpu_s']:.0f} s in {res['units']} units, {res['jobs']} at a time")
        if a.readme:
            write_readme(res)
        return res

    def save(res):
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(a.json + ".tmp")
            tmp.write_text(json.dumps(res, indent=2, ensure_ascii=False))
            tmp.replace(a.json)

    makers = default_makers(pairs, static=not a.no_static)
    res = run_suite(names, budgets, makers=makers[:1] if a.only_auto else makers, e2e=e2e,
                    error_rate=a.error_rate, seed=a.seed, out=Path(a.out), log=log, save=save)
    save(res)
    print(markdown(res))
    print(f"wall {res['wall_s']:.0f} s")
    if a.readme:
        write_readme(res)
    return res


if __name__ == "__main__":
    main()

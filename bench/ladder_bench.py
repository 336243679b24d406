"""The student ladder (``student.kind: auto``) on the task suite's data: auto's choice vs every rung vs peers.

    nice python bench/ladder_bench.py --tasks tweet-sentiment,trec-fine,bbc-news --budgets 1000,4000 --json out.json

Per task and label budget: the suite's simulated teacher (bench/suite/teacher.py) labels the same nested
sample bench/suite/run.py uses; the ladder (protege.students.ladder, the same code ``protege train`` runs for
``auto``) trains every rung on those labels only, with the task's whole pool as the unlabelled inputs; every
rung refitted on all rows, TF-IDF+LR and frozen MiniLM+LR (bench/suite/run.py's peers) are scored on gold:
accuracy with a 95% bootstrap CI, ms/item (CPU time of single-item calls on one thread: the machine is shared,
wall time is noise) and the ladder's own CV agreement. Gold is never trained on or used for the choice.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import warnings

warnings.filterwarnings("ignore")

import numpy as np

HERE = Path(__file__).resolve().parent
for p in (HERE / "suite", HERE):
    sys.path.insert(0, str(p))

import run as suite  # noqa: E402  bench/suite/run.py (read only)
from tasks import load_task  # noqa: E402
from teacher import SimulatedTeacher  # noqa: E402

from protege.stats import bootstrap_ci  # noqa: E402
from protege.students.ladder import build_rungs, run_ladder, single_ms  # noqa: E402
from protege.students.rungs import Data  # noqa: E402
from protege.task import TaskSpec  # noqa: E402


def _spec(labels):
    return TaskSpec.model_validate({"name": "bench", "kind": "classify", "instruction": "-", "labels": list(labels),
                                    "data": {"inputs": "-", "gold": "-"}, "teacher": {"model": "sim"}})


def _score(name, predict, gx, gy, t_gold, extra=None):
    pred = list(predict(gx))
    ok = np.array([p == y for p, y in zip(pred, gy)], dtype=float)
    lo, hi = bootstrap_ci(ok)
    return {"model": name, "accuracy": float(ok.mean()), "ci": [float(lo), float(hi)],
            "agreement_gold": float(np.mean([p == t for p, t in zip(pred, t_gold)])), **(extra or {})}


def bench_task(name: str, budgets: list[int], out: Path, log) -> list[dict]:
    import torch

    task = load_task(name)
    sim = SimulatedTeacher.for_task(task, error_rate=0.10, seed=0, cache_dir=out / "cache")
    order = suite.sample_order(task, 0)
    gx, gy = [g["text"] for g in task.gold], [g["label"] for g in task.gold]
    t_gold, _ = sim.label(gx)
    t_acc = float(np.mean([a == b for a, b in zip(t_gold, gy)]))
    pool = [r["text"] for r in task.pool]
    rows = []
    for budget in sorted(set(min(b, len(task.pool)) for b in budgets)):
        sample = [task.pool[i]["text"] for i in order[:budget]]
        t_labels, t_probs = sim.label(sample)
        t_probs = suite.topk_renorm(t_probs)
        labels = list(task.labels)
        d = Data(texts=sample, P=t_probs.astype(np.float32), hard=np.array([labels.index(y) for y in t_labels]),
                 weight=np.ones(len(sample), np.float32), labels=labels, pool=pool)
        spec = _spec(labels)
        t0 = time.perf_counter()
        winner, students, ladder, curve = run_ladder(d, build_rungs(spec, d), max_ms=spec.student.max_ms,
                                                     cv_folds=spec.student.cv_folds, log=log)
        wall = time.perf_counter() - t0
        base = {"task": name, "budget": budget, "teacher_gold": t_acc}
        rows.append({**base, "model": "teacher (simulated)", "accuracy": t_acc})
        for r in ladder["rungs"]:
            st = students.get(r["name"])
            if st is None:
                rows.append({**base, "model": r["name"], "error": r.get("error")})
                continue
            tag = " (auto's choice)" if r["name"] == ladder["chosen"] else ""
            rows.append({**base, **_score(r["name"] + tag, st.predict, gx, gy, t_gold, {
                "cv_agreement": r["cv_agreement"], "ms_p50": r["ms_p50"], "params": r["params"],
                "eligible": r["eligible"], "train_s": r["train_s"]})})
        for label, fit in (("TF-IDF + LR", suite.fit_tfidf), ("MiniLM-L6 (frozen, torch) + LR", suite.fit_minilm_frozen)):
            m = fit(sample, t_labels, labels, probs=t_probs)
            torch.set_num_threads(1)
            rows.append({**base, **_score(label, m.predict, gx, gy, t_gold, {"ms_p50": single_ms(m.predict, gx, 30)})})
        rows.append({**base, "model": "ladder", "chosen": ladder["chosen"], "why": ladder["why"], "folds": ladder["folds"],
                     "ladder_wall_s": wall, "learning_curve": curve})
        log(f"[{name} {budget}] chose {ladder['chosen']}: {ladder['why']} ({wall:.0f} s)")
        for r in rows:
            if r.get("budget") == budget and "accuracy" in r:
                log(f"   {r['model']:34s} {r['accuracy']:.3f} [{r.get('ci', [0, 0])[0]:.3f}, {r.get('ci', [0, 0])[1]:.3f}]"
                    f"  cv {r.get('cv_agreement') or 0:.3f}  {r.get('ms_p50') or 0:.2f} ms")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="tweet-sentiment,trec-fine,bbc-news")
    ap.add_argument("--budgets", default="1000,4000")
    ap.add_argument("--out", default="runs/suite")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    rows = []
    for name in a.tasks.split(","):
        rows += bench_task(name, [int(b) for b in a.budgets.split(",")], Path(a.out), log)
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

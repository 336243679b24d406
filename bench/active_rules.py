"""Which rule should pick the teacher's next batch? The shipped one (margin) against the usual alternatives, over
several draws, on the suite tasks.

Everything but the rule is bench/active_cascade.py's active run: the same draw of the task (``--seeds``: dev split
and random order), the same random seed batch, the same static student refitted each round, the same grid. Per
rule and draw, the calls needed to reach the random run's final dev agreement (as a share of the budget); then the
same read off the curves *averaged over the draws* (the random target averaged too), which is steadier than any
one draw: a single dev agreement on 1,000 items moves by ±2.7 points (95%).

Rules (all get the round's student probabilities ``P`` and embeddings ``E`` of the unlabelled pool):

* ``margin`` — shipped (:func:`protege.stages.active.pick_batch`): smallest top-1 minus top-2, near-duplicates
  skipped.
* ``entropy`` — largest predictive entropy.
* ``badge`` — k-means++ seeding on gradient embeddings ``(p - onehot(argmax p)) ⊗ e`` (Ash et al., 2020):
  uncertainty and diversity in one draw.
* ``cal`` — contrastive: largest mean KL from the 10 nearest labelled inputs' predictions to the input's
  (Margatina et al., 2021).
* ``mix`` — half the batch by margin, half at random.
* ``kmeans`` — the 5x least-sure, clustered into ``batch`` groups; the least sure of each group.

    python bench/active_rules.py --tasks tweet-sentiment,trec-fine --seeds 0,1,2 --rules margin,badge
    python bench/active_rules.py --quick              # 2 tasks, small budget, 2 draws (~2 min)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.active_cascade import active_curve, draw_args, first_reach, prepare, random_curve  # noqa: E402
from bench.suite.tasks import MissingData  # noqa: E402
from protege.stages.active import margins, pick_batch  # noqa: E402


def unit(E: np.ndarray) -> np.ndarray:
    return E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12)


def entropy(P: np.ndarray, n: int) -> list[int]:
    H = -(P * np.log(np.clip(P, 1e-12, 1.0))).sum(1)
    return [int(i) for i in np.argsort(-H, kind="stable")[:n]]


def badge(P: np.ndarray, E: np.ndarray, n: int, seed: int = 0) -> list[int]:
    """k-means++ seeding on g_i = a_i ⊗ x_i with a_i = p_i - onehot(argmax p_i), x_i the unit embedding; distances
    need no outer products: <a⊗x, b⊗y> = <a, b> <x, y>."""
    A = P.astype(float).copy()
    A[np.arange(len(P)), P.argmax(1)] -= 1.0
    X = unit(E.astype(float))
    sq = (A * A).sum(1)  # |x| = 1
    chosen = [int(np.argmax(sq))]
    d = np.full(len(P), np.inf)
    rng = np.random.default_rng(seed)
    while len(chosen) < min(n, len(P)):
        j = chosen[-1]
        d = np.maximum(np.minimum(d, sq + sq[j] - 2 * (A @ A[j]) * (X @ X[j])), 0.0)
        d[chosen] = 0.0
        if d.sum() <= 0:
            break
        chosen.append(int(rng.choice(len(P), p=d / d.sum())))
    return chosen


def cal(P: np.ndarray, E: np.ndarray, PL: np.ndarray, EL: np.ndarray, n: int, k: int = 10) -> list[int]:
    """Mean KL(p(labelled neighbour) || p(x)) over the k nearest labelled inputs (cosine)."""
    k = min(k, len(PL))
    S = unit(E) @ unit(EL).T
    nn = np.argpartition(-S, k - 1, axis=1)[:, :k]
    logp = np.log(np.clip(P, 1e-9, 1.0))
    score = np.zeros(len(P))
    for j in range(k):
        Q = PL[nn[:, j]]
        score += (Q * (np.log(np.clip(Q, 1e-9, 1.0)) - logp)).sum(1)
    return [int(i) for i in np.argsort(-score, kind="stable")[:n]]


def mix(P: np.ndarray, E: np.ndarray, n: int, seed: int = 0) -> list[int]:
    half = pick_batch(P, E, n // 2, 5, 0.95)
    rest = np.setdiff1d(np.arange(len(P)), half)
    return half + [int(i) for i in np.random.default_rng(seed).choice(rest, n - len(half), replace=False)]


def kmeans(P: np.ndarray, E: np.ndarray, n: int) -> list[int]:
    from sklearn.cluster import KMeans

    order = np.argsort(margins(P), kind="stable")[: 5 * n]
    groups = KMeans(min(n, len(order)), n_init=1, random_state=0).fit_predict(unit(E[order]))
    first = {}
    for pos, g in enumerate(groups):  # order is least sure first: the first of each group is its least sure
        first.setdefault(int(g), int(order[pos]))
    return list(first.values())


RULES = ("margin", "entropy", "badge", "cal", "mix", "kmeans")


def chooser(rule: str, d):
    """``choose(student, rest_texts, chosen, n)`` for :func:`bench.active_cascade.active_curve`; a rule that picks
    fewer than ``n`` (BADGE when all distances vanish, k-means with empty groups) is filled up in margin order, so
    every curve point has the labels its grid value says."""
    def choose(s, rt, chosen, n):
        P = s.predict_proba(rt)
        pick = rule_pick(s, P, rt, chosen, n)
        if len(pick) < n:
            have = set(pick)
            pick += [int(i) for i in np.argsort(margins(P), kind="stable") if int(i) not in have][: n - len(pick)]
        return pick

    def rule_pick(s, P, rt, chosen, n):
        E = s.encode(rt)
        if rule == "margin":
            return pick_batch(P, E, n, 5, 0.95)
        if rule == "entropy":
            return entropy(P, n)
        if rule == "badge":
            return badge(P, E, n, seed=len(chosen))
        if rule == "cal":
            lt = [d.texts[i] for i in chosen]
            return cal(P, E, s.predict_proba(lt), s.encode(lt), n)
        if rule == "mix":
            return mix(P, E, n, seed=len(chosen))
        if rule == "kmeans":
            return kmeans(P, E, n)
        raise ValueError(f"unknown rule {rule!r} (one of {', '.join(RULES)})")
    return choose


def share(grid, curve, target, budget):
    n = first_reach(grid, curve, target)
    return None if n is None else n / budget


def run_task(name: str, rules: list[str], seeds: list[int], a) -> dict:
    draws = []
    for seed in seeds:
        a.seed = seed
        d = prepare(name, a)
        rc, _ = random_curve(d, a)
        row = {"seed": seed, "random": rc, "rules": {}}
        for rule in rules:
            row["rules"][rule] = active_curve(d, a, chooser(rule, d))
            print(f"{name} seed {seed} {rule}: share {share(d.grid, row['rules'][rule], rc[-1], d.budget)} "
                  f"final {row['rules'][rule][-1]:.3f} (random {rc[-1]:.3f})", flush=True)
        draws.append(row)
    mean_r = np.mean([r["random"] for r in draws], axis=0)
    out = {"task": name, "grid": d.grid, "budget": d.budget, "n_dev": d.n_dev, "draws": draws,
           "mean_random": mean_r.tolist(), "random_share": share(d.grid, mean_r, mean_r[-1], d.budget), "mean": {}}
    for rule in rules:
        mc = np.mean([r["rules"][rule] for r in draws], axis=0)
        out["mean"][rule] = {"curve": mc.tolist(), "share": share(d.grid, mc, mean_r[-1], d.budget),
                             "shares": [share(d.grid, r["rules"][rule], r["random"][-1], d.budget) for r in draws],
                             "final": float(mc[-1])}
    return out


def table(rows: list[dict], rules: list[str]) -> str:
    def pct(x):
        return "not reached" if x is None else f"{x:.0%}"

    out = ["| task | random final (mean), first reached at | " + " | ".join(f"{r}: share on mean curves (per draw) / final"
                                                      for r in rules) + " |",
           "|---|---|" + "---|" * len(rules)]
    for row in rows:
        cells = [f"{pct(m['share'])} ({', '.join(pct(s) for s in m['shares'])}) / {m['final']:.3f}"
                 for m in (row["mean"][r] for r in rules)]
        out.append(f"| {row['task']} | {row['mean_random'][-1]:.3f}, {pct(row['random_share'])} | " + " | ".join(cells) + " |")
    wins = {r: sum(row["mean"][r]["share"] is not None and row["mean"][r]["share"] <= 0.5 for row in rows)
            for r in rules}
    out.append("")
    out.append("≤ 50% of the calls on the mean curves: " + ", ".join(f"{r} {w}/{len(rows)}" for r, w in wins.items()))
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    draw_args(p, budget=1500, batch=150, seed_size=150)
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--quick", action="store_true", help="2 tasks, 2 draws, budget 400, batch 50")
    p.add_argument("--json", help="also write the rows (every curve) and the settings here")
    a = p.parse_args()
    import torch

    torch.set_num_threads(1)
    if a.quick:
        a.tasks, a.seeds, a.budget, a.batch, a.seed_size, a.dev = "sms-spam,tweet-sentiment", "0,1", 400, 50, 50, 400
    rules, seeds = a.rules.split(","), [int(s) for s in a.seeds.split(",")]
    for r in rules:
        if r not in RULES:
            p.error(f"unknown rule {r!r} (one of {', '.join(RULES)})")
    t0, rows = time.perf_counter(), []
    for name in a.tasks.split(","):
        try:
            rows.append(run_task(name, rules, seeds, a))
        except MissingData as e:
            print(f"{name}: skipped ({e})", flush=True)
    print()
    print(table(rows, rules))
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    if a.json:
        Path(a.json).write_text(json.dumps({"settings": {k: v for k, v in vars(a).items() if k != "json"},
                                            "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Benchmark: labelling on a local Ray cluster vs one process, same server, same total concurrency; and the Ray
path's budget overshoot.

The server is ``tests/fault_server.py`` in its own process (a fixed artificial latency per request, no faults).
One process: :func:`~protege.stages.generate.label_with_ledger` with ``concurrency`` C into a fresh ledger. Ray:
:func:`~protege.stages.generate_ray.label_on_ray` on a local cluster of ``--workers`` CPUs, each worker C / workers
(the same total), each into its own ledger, merged at the end — timed end to end (sharding, worker start-up,
teacher per worker, merge). Runs alternate (one, ray, one, ray, ...) on fresh inputs (nothing answered from a
ledger) and the medians are compared, plus the median of per-rep ratios (cancels drift in machine load).

Budget: the Ray path with ``budget_usd`` set to what ``--budget-share`` of the inputs cost, on fresh inputs, one run
per rep: spent (ledger $) vs budget — overshoot (spent above the budget: should be 0, the gates reserve calls in
flight at an upper-bound estimate) and what the per-worker slices leave unspent; the server's call count is
checked against the ledger's.

Usage: ``python bench/ray_generate.py [--n 2000] [--concurrency 16] [--workers 2] [--latency 0.05] [--reps 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
LABELS = ["sports", "business", "tech", "politics", "entertainment"]
KEY = "PROTEGE_BENCH_KEY"


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fault_server.py"), "--latency", str(latency)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"fault server did not start: {line!r}")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}"


def server_calls(root: str) -> int:
    import httpx

    return int(httpx.get(f"{root}/stats", timeout=10).json()["calls"])


def make_task(base_url: str, concurrency: int, budget_usd: float | None = None):
    from protege.task import parse_task

    return parse_task({
        "name": "bench", "kind": "classify", "instruction": "What is the topic of the news article?",
        "labels": LABELS, "data": {"inputs": "x", "gold": "y"},
        "teacher": {"backend": "openai", "model": "gpt-4o-mini", "base_url": base_url, "api_key_env": KEY,
                    "concurrency": concurrency, "max_tokens": 8, "top_logprobs": 5, "price_in_per_1m": 0.15,
                    "price_out_per_1m": 0.60, "budget_usd": budget_usd},
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="items per run")
    ap.add_argument("--concurrency", type=int, default=16, help="total calls in flight (both paths)")
    ap.add_argument("--workers", type=int, default=2, help="Ray workers (= local cluster CPUs)")
    ap.add_argument("--latency", type=float, default=0.05, help="server latency per request, seconds")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--budget-share", type=float, default=0.5, help="budget run: budget = cost of this share of n")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args()

    os.environ[KEY] = "sk-bench"  # before the cluster starts: its workers inherit it
    import ray

    from protege import progress
    from protege.registry import make_teacher
    from protege.stages.generate import CONTENT_FAILURES, label_with_ledger
    from protege.stages.generate_ray import label_on_ray
    from protege.teachers.ledger import Ledger

    progress.QUIET["on"] = True
    proc, root = start_server(a.latency)
    base_url = f"{root}/v1"
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=a.workers, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray_start_s = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp(prefix="protege-raybench-"))
    task = make_task(base_url, a.concurrency)
    teacher = make_teacher(task)

    def texts(tag: str, n: int) -> list[str]:
        return [f"{tag} item {i}: the match ended 2-1 [label={LABELS[i % 5]}]" for i in range(n)]

    def one(tag: str) -> float:
        with Ledger(tmp / f"{tag}.sqlite") as led:
            c0, s = server_calls(root), time.perf_counter()
            _, st = label_with_ledger(teacher, texts(tag, a.n), led, stage="generate")
            wall = time.perf_counter() - s
            assert st["calls"] == a.n and server_calls(root) - c0 == a.n and led.count("ok") == a.n
        return wall

    def on_ray(tag: str, t=task) -> tuple[float, dict, float]:
        with Ledger(tmp / tag / "ledger.sqlite") as led:
            c0, s = server_calls(root), time.perf_counter()
            st = label_on_ray(t, teacher, led, [("generate", texts(tag, a.n), 1)], label=label_with_ledger,
                              kept_reasons=CONTENT_FAILURES, workers=a.workers)
            wall = time.perf_counter() - s
            assert server_calls(root) - c0 == int(led.db.execute("SELECT sum(requests) FROM calls").fetchone()[0])
            return wall, st, led.spent()

    try:
        teacher.answer([teacher.request(t) for t in texts("warm", a.concurrency)])  # the driver's client, warm
        on_ray("warm-ray")  # worker processes started and protege imported in them, as on a long-lived cluster
        one_s, ray_s, ratios, per_worker = [], [], [], []
        for rep in range(a.reps):
            o = one(f"one{rep}")
            r, st, _ = on_ray(f"ray{rep}")
            assert st["calls"] == a.n and st["merged_calls"] == a.n
            one_s.append(o)
            ray_s.append(r)
            ratios.append(r / o)
            per_worker.append([w["calls"] for w in st["per_worker"]])
            print(f"rep {rep}: one process {o:.2f} s ({a.n / o:.0f} calls/s), Ray {r:.2f} s ({a.n / r:.0f} calls/s), "
                  f"ratio {r / o:.3f}", flush=True)

        # budget: the same Ray path with budget_usd = the cost of budget_share * n calls (measured per call above)
        with Ledger(tmp / "one0.sqlite") as led:
            per_call = led.spent() / a.n
        budget = round(per_call * a.n * a.budget_share, 8)
        over, unspent, stopped = [], [], []
        for rep in range(a.reps):
            _, st, spent = on_ray(f"budget{rep}", make_task(base_url, a.concurrency, budget))
            over.append(max(0.0, spent - budget))
            unspent.append((budget - spent) / budget)
            stopped.append(st["budget_stopped"])
            print(f"budget rep {rep}: budget ${budget:.6f}, spent ${spent:.6f} ({st['calls']} calls), overshoot "
                  f"${over[-1]:.6f}, unspent {unspent[-1]:.1%}, workers stopped by their slice {st['budget_stopped']}",
                  flush=True)
    finally:
        teacher.close()
        ray.shutdown()
        proc.terminate()

    res = {
        "n": a.n, "concurrency_total": a.concurrency, "workers": a.workers, "latency_s": a.latency, "reps": a.reps,
        "one_process_s": one_s, "ray_s": ray_s, "one_process_median_s": statistics.median(one_s),
        "ray_median_s": statistics.median(ray_s), "ratio_ray_over_one_median_of_reps": statistics.median(ratios),
        "ray_calls_per_worker": per_worker, "ray_cluster_start_s": ray_start_s,
        "budget_usd": budget, "budget_overshoot_usd_max": max(over), "budget_unspent_share": unspent,
        "budget_workers_stopped": stopped, "cpus": os.cpu_count(), "python": platform.python_version(),
        "load_avg_1m": os.getloadavg()[0],
    }
    print(json.dumps(res, indent=1))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

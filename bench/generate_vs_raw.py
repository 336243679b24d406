"""Benchmark: protege's labelling vs a plain loop of the raw ``openai`` client, same server, same concurrency.

Both sides send the *same* request bodies (built by protege's OpenAI teacher: system prompt, input,
``max_tokens``, ``logprobs`` / ``top_logprobs``) to the same loopback OpenAI-compatible server
(``tests/fault_server.py``, in its own process) that answers every request after a fixed artificial
latency. The raw side is what a user would write: ``openai.AsyncOpenAI`` + an ``asyncio.Semaphore(32)``
+ ``gather``, keeping only the reply text. Both run in this one process, one after the other. protege's side is ``label_with_ledger`` — request keys,
ledger lookup, rate-limit/budget gate, retries, answer parsing with soft labels from top_logprobs, one
SQLite commit per answer — into a fresh ledger. Runs alternate (raw, protege, raw, ...) and the medians
are compared (and the median of per-rep ratios, which cancels drift in machine load). Client CPU time
per call is printed too: on a machine where the client is CPU-bound, that is what the wall ratio
measures. Then protege runs again on the same ledger: the server counts the calls that re-run made.

Goals: wall-time ratio protege / raw <= 1.05; re-run cost 0 calls.

Usage: ``python bench/generate_vs_raw.py [--n 2000] [--concurrency 32] [--latency 0.05] [--reps 3]``
"""

from __future__ import annotations

import argparse
import asyncio
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
LABELS = ["sports", "business", "tech", "politics", "entertainment"]


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


def make_teacher(base_url: str, concurrency: int):
    from protege.task import parse_task
    from protege.registry import make_teacher as mk

    os.environ.setdefault("PROTEGE_BENCH_KEY", "sk-bench")
    task = parse_task({
        "name": "bench", "kind": "classify", "instruction": "What is the topic of the news article?",
        "labels": LABELS, "data": {"inputs": "x", "gold": "y"},
        "teacher": {"backend": "openai", "model": "gpt-4o-mini", "base_url": base_url, "api_key_env": "PROTEGE_BENCH_KEY",
                    "concurrency": concurrency, "max_tokens": 8, "top_logprobs": 5},
    })
    return mk(task)


async def raw_loop(base_url: str, bodies: list[dict], concurrency: int) -> list[str]:
    import openai

    client = openai.AsyncOpenAI(api_key="sk-bench", base_url=base_url)
    sem = asyncio.Semaphore(concurrency)

    async def one(body):
        async with sem:
            r = await client.chat.completions.create(**body)
            return r.choices[0].message.content

    try:
        return await asyncio.gather(*(one(b) for b in bodies))
    finally:
        await client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="items per run")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--latency", type=float, default=0.05, help="server latency per request, seconds")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per side (medians compared)")
    ap.add_argument("--progress", action="store_true", help="show protege's Rich progress bar (as the CLI does)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args()

    from protege import progress
    from protege.stages.generate import label_with_ledger
    from protege.teachers.ledger import Ledger

    progress.QUIET["on"] = not a.progress
    proc, root = start_server(a.latency)
    base_url = f"{root}/v1"
    try:
        teacher = make_teacher(base_url, a.concurrency)
        texts = {rep: [f"bench run {rep} item {i}: the match ended 2-1 [label={LABELS[i % 5]}]" for i in range(a.n)]
                 for rep in range(a.reps)}
        warm = [f"warm-up {i} [label=tech]" for i in range(a.concurrency)]
        asyncio.run(raw_loop(base_url, [teacher.request(t) for t in warm], a.concurrency))
        teacher.answer([teacher.request(t) for t in warm])  # starts protege's client and event loop

        raw_s, ours_s, raw_cpu, ours_cpu = [], [], [], []
        tmp = Path(tempfile.mkdtemp(prefix="protege-bench-"))

        def run_raw(rep):
            bodies = [teacher.request(t) for t in texts[rep]]
            c0, p0, t0 = server_calls(root), time.process_time(), time.perf_counter()
            out = asyncio.run(raw_loop(base_url, bodies, a.concurrency))
            raw_s.append(time.perf_counter() - t0)
            raw_cpu.append(time.process_time() - p0)
            assert len(out) == a.n and server_calls(root) - c0 == a.n

        def run_ours(rep):
            # protege labels different texts than raw did (fresh work), into a fresh ledger
            ptexts = [t.replace("bench run", "bench protege run") for t in texts[rep]]
            c0 = server_calls(root)
            with Ledger(tmp / f"ledger-{rep}.sqlite") as led:
                p0, t0 = time.process_time(), time.perf_counter()
                answers, stats = label_with_ledger(teacher, ptexts, led, stage="bench")
                ours_s.append(time.perf_counter() - t0)
                ours_cpu.append(time.process_time() - p0)
            assert stats["calls"] == a.n and stats["failed"] == 0 and server_calls(root) - c0 == a.n, stats
            assert all(x[0].soft == "logprobs" for x in answers)
            return ptexts

        for rep in range(a.reps):  # alternate which side goes first, so drift in machine load hits both
            if rep % 2 == 0:
                run_raw(rep)
                ptexts = run_ours(rep)
            else:
                ptexts = run_ours(rep)
                run_raw(rep)
            print(f"rep {rep}: raw openai {raw_s[-1]:.3f} s   protege {ours_s[-1]:.3f} s   "
                  f"(ratio {ours_s[-1] / raw_s[-1]:.3f})", flush=True)

        # re-run the last protege run on its ledger: the server counts what it costs
        c0 = server_calls(root)
        with Ledger(tmp / f"ledger-{a.reps - 1}.sqlite") as led:
            t0 = time.perf_counter()
            _, rstats = label_with_ledger(teacher, ptexts, led, stage="bench")
            rerun_s = time.perf_counter() - t0
        rerun_calls = server_calls(root) - c0
        teacher.close()
    finally:
        proc.terminate()
        proc.wait(10)

    raw, ours = statistics.median(raw_s), statistics.median(ours_s)
    paired = statistics.median(o / r for o, r in zip(ours_s, raw_s))
    cpu_raw, cpu_ours = statistics.median(raw_cpu) / a.n * 1e3, statistics.median(ours_cpu) / a.n * 1e3
    ideal = a.n / a.concurrency * a.latency
    fig = {
        "n": a.n, "concurrency": a.concurrency, "latency_s": a.latency, "reps": a.reps,
        "raw_openai_s": raw, "protege_s": ours, "ratio": ours / raw, "paired_ratio": paired, "ideal_s": ideal,
        "raw_s_all": raw_s, "protege_s_all": ours_s, "client_cpu_ms_per_call": {"raw": cpu_raw, "protege": cpu_ours},
        "raw_calls_per_s": a.n / raw, "protege_calls_per_s": a.n / ours,
        "rerun_calls": rerun_calls, "rerun_s": rerun_s, "rerun_cache_hits": rstats["cache_hits"],
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, Python {platform.python_version()}",
    }
    print()
    print(f"{a.n} requests, concurrency {a.concurrency}, server latency {a.latency * 1000:.0f} ms "
          f"(ideal {ideal:.2f} s), median of {a.reps}")
    print(f"  raw openai.AsyncOpenAI loop : {raw:7.3f} s  ({a.n / raw:6.0f} calls/s)")
    print(f"  protege label_with_ledger   : {ours:7.3f} s  ({a.n / ours:6.0f} calls/s)")
    print(f"  ratio protege / raw         : {ours / raw:7.3f}   (goal <= 1.05; median of per-rep ratios {paired:.3f})")
    print(f"  client CPU per call         : raw {cpu_raw:.2f} ms, protege {cpu_ours:.2f} ms (all threads of this "
          f"process: for protege, everything it does per call)")
    print(f"  re-run on the same ledger   : {rerun_calls} calls to the server, {rstats['cache_hits']} answers from the "
          f"ledger, {rerun_s:.3f} s   (goal: 0 calls)")
    if a.json:
        a.json.write_text(json.dumps(fig, indent=2))


if __name__ == "__main__":
    main()

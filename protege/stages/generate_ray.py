"""Label on a Ray cluster: ``protege generate --ray [ADDRESS]`` / ``teacher.engine: ray``.

What runs where. The driver (the ``protege generate`` process) reads the pool as today, hashes every request into
its ledger key, and leaves out what the run's ledger already answers. The rest is dealt into ``n`` shards by a
hash of the input text (the same input always lands in the same shard) and each shard is one Ray task: a worker
that builds the task's own teacher and calls :func:`~protege.stages.generate.label_with_ledger` — the same code
path as one machine: async client, retries, re-asks, rate limits, soft labels, leases — committing to its
*own* ledger file, ``<out>/ledgers-ray/worker-<k>of<n>.sqlite``. At the end the driver merges those files into
the run's ledger (:meth:`Ledger.merge`) and deletes them; ``generate`` then reads every answer from the merged
ledger (zero calls) and writes the artifact exactly as a single-process run would.

Why not Ray Data's ``map_batches``: a retried or restarted batch has no stable identity, so it could not find
the ledger file its first attempt wrote, and would pay again for what that attempt got. A hash shard does: a
worker killed mid-run is retried by Ray (``max_retries``) on the same shard and the same file, and its ledger
answers what it had already bought. The pool is in the driver's memory anyway (the artifact is built there),
so reading it with Ray Data would move nothing off the driver.

Resume. A driver killed mid-run leaves the worker files behind; the next run merges them first, then sends
only what is still missing. Calls in flight at a kill are lost, as on one machine (at most each worker's
concurrency).

Budget: a per-worker slice, not a shared actor. ``budget_usd`` / ``budget_tokens`` minus what the run's
ledger has spent, split evenly; each worker's gate (:class:`~protege.teachers.calls.BudgetGate`: reserves calls
in flight at their upper-bound estimate) holds its slice, so the sum holds the budget with no round trip per
call. The cost: a worker that runs out stops while another may have money left (the shards are equal hash
slices, so they cost about the same), and a single call larger than a slice is refused as ``over_budget``.
``concurrency``, ``rpm`` and ``tpm`` are totals too, split the same way (the provider's limits are per account).
"""

from __future__ import annotations

import hashlib
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Callable, Sequence

from protege.parallel import connect, unwrap
from protege.progress import bar
from protege.teachers.ledger import BudgetExceeded, Ledger, request_key

WORKER_DIR = "ledgers-ray"
POLL_S = 0.5


def shard_of_text(text: str, n: int) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % n


def split_evenly(total: int, k: int, n: int) -> int:
    """Worker ``k``'s part of an integer total over ``n`` workers (parts differ by at most 1; the sum is ``total``)."""
    return total // n + (k < total % n)


def worker_task(task, k: int, n: int, budget_tokens: int | None):
    """The task as worker ``k`` of ``n`` runs it: concurrency / rpm / tpm / token budget its share of the totals."""
    t = task.teacher
    upd = {"concurrency": max(1, split_evenly(t.concurrency, k, n)), "budget_tokens": budget_tokens}
    for f in ("rpm", "tpm"):
        if getattr(t, f) is not None:
            upd[f] = max(1, split_evenly(getattr(t, f), k, n))
    return task.model_copy(update={"teacher": t.model_copy(update=upd)})


def build_teacher(task):
    """The task's teacher, as ``generate`` builds it (text kinds wrap the backend in a TextTeacher)."""
    from protege.kinds import kind_of
    from protege.registry import make_teacher

    if kind_of(task).labelled:
        return make_teacher(task)
    from protege.teachers.textgen import TextTeacher

    return TextTeacher(make_teacher(task), task)


def label_shard(job: dict) -> dict:
    """One Ray task: label this worker's shard of each stage into its own ledger file; returns its stats.

    A budget stop is a result (the stats say so), not an error; any other exception propagates to the driver."""
    from protege import progress

    progress.QUIET["on"] = True  # one bar, the driver's
    for name, value in job["env"].items():  # the API key, when this worker's node has none of its own
        os.environ.setdefault(name, value)
    teacher = build_teacher(job["task"])
    out = {"worker": job["k"], "pid": os.getpid(), "host": socket.gethostname(), "stages": {}, "stopped": None}
    try:
        with Ledger(job["ledger"]) as led:
            for stage, texts, samples in job["stages"]:
                try:
                    _, st = job["label"](teacher, texts, led, stage=stage, samples=samples,
                                         budget_usd=job["budget_usd"], description=f"worker {job['k']}: {stage}")
                except BudgetExceeded as e:
                    out["stages"][stage], out["stopped"] = getattr(e, "stats", {}), str(e)
                    break
                out["stages"][stage] = st
    finally:
        teacher.close()
    return out


def answered(ledger: Ledger, keys: Sequence[str], kept_reasons: Sequence[str]) -> set[str]:
    """Keys the ledger answers (ok, or failed for a reason not re-bought); read-only: hit counts untouched."""
    out: set[str] = set()
    kept = list(kept_reasons)
    for i in range(0, len(keys), 500):
        chunk = list(keys[i : i + 500])
        q = (f"SELECT key FROM calls WHERE key IN ({','.join('?' * len(chunk))}) "
             f"AND (status = 'ok' OR reason IN ({','.join('?' * len(kept))}))")
        out.update(k for (k,) in ledger.db.execute(q, chunk + kept))
    return out


def worker_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("worker-*.sqlite")) if folder.is_dir() else []


def merge_worker_ledgers(ledger: Ledger, folder: Path, *, delete: bool = True) -> int:
    """Merge every worker ledger in ``folder`` into ``ledger`` (idempotent); then delete them. Calls added."""
    added = 0
    for f in worker_files(folder):
        added += ledger.merge(f)["added"]
        if delete:
            for p in (f, Path(f"{f}-wal"), Path(f"{f}-shm")):
                p.unlink(missing_ok=True)
    return added


def _recorded(folder: Path) -> int:
    """Calls the workers have committed so far (for the progress bar)."""
    n = 0
    for f in worker_files(folder):
        try:
            db = sqlite3.connect(f"file:{f}?mode=ro", uri=True, timeout=1)
            try:
                n += db.execute("SELECT count(*) FROM calls").fetchone()[0]
            finally:
                db.close()
        except sqlite3.Error:  # not created yet / being migrated: counted next time
            pass
    return n


def label_on_ray(task, teacher, ledger: Ledger, stages: Sequence[tuple[str, list[str], int]], *,
                 label: Callable, kept_reasons: Sequence[str] = (), address: str | None = None,
                 workers: int | None = None) -> dict:
    """Send every call ``stages`` [(stage, texts, samples)] needs that ``ledger`` cannot answer, on Ray; merge the
    workers' ledgers into ``ledger``. ``label``: :func:`~protege.stages.generate.label_with_ledger` (passed in, so
    this module does not import the stage that dispatches to it). Returns the Ray run's stats."""
    t0 = time.perf_counter()
    ray = connect(address)
    folder = ledger.path.parent / WORKER_DIR
    leftover = merge_worker_ledgers(ledger, folder)  # a driver that died left these
    n = workers or task.teacher.ray_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    kept = kept_reasons if teacher.cfg.retry_failed == "transient" else ()
    shards: list[list[tuple[str, list[str], int]]] = [[] for _ in range(n)]
    total = 0
    for stage, texts, samples in stages:
        parts: list[dict[str, None]] = [{} for _ in range(n)]
        keys = [[request_key(teacher.name, teacher.request(t, s), s) for s in range(samples)] for t in texts]
        done = answered(ledger, [k for ks in keys for k in ks], kept)
        for t, ks in zip(texts, keys):
            missing = sum(k not in done for k in ks)
            if missing and t not in parts[shard_of_text(t, n)]:
                parts[shard_of_text(t, n)][t] = None
                total += missing
        for k in range(n):
            if parts[k]:
                shards[k].append((stage, list(parts[k]), samples))
    cfg = task.teacher
    usd = None if cfg.budget_usd is None else max(0.0, cfg.budget_usd - ledger.spent()) / n
    tok_left = None if cfg.budget_tokens is None else max(0, cfg.budget_tokens - ledger.tokens_used())
    key_env = getattr(cfg, "api_key_env", None)
    env = {key_env: os.environ[key_env]} if key_env and key_env in os.environ else {}
    remote = ray.remote(num_cpus=1, num_gpus=cfg.ray_gpus, max_retries=3)(label_shard)  # a dead worker: shard re-run
    refs = {}
    for k in range(n):
        if shards[k]:
            job = {"task": worker_task(task, k, n, None if tok_left is None else split_evenly(tok_left, k, n)),
                   "k": k, "n": n, "stages": shards[k], "budget_usd": usd, "label": label, "env": env,
                   "ledger": str(folder / f"worker-{k}of{n}.sqlite")}
            refs[remote.remote(job)] = k
    results, error, pending = [], None, list(refs)
    # progress from the workers' files while they write them: on one machine only (SQLite's WAL is not shared
    # across machines, even on shared storage); on a cluster, per finished shard
    one_node = sum(bool(x.get("Alive")) for x in ray.nodes()) <= 1
    try:
        with bar(f"teacher on Ray: {n} workers", total) as advance:
            seen = 0
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
                for r in ready:
                    try:
                        results.append(ray.get(r))
                    except Exception as e:  # noqa: BLE001 - the others finish; the first error is raised after the merge
                        error = error or unwrap(e)
                now = _recorded(folder) if one_node else sum(
                    st.get("calls", 0) + st.get("failed_kept", 0) for x in results for st in x["stages"].values())
                advance(max(0, now - seen))
                seen = max(seen, now)
    finally:
        if pending:  # the driver is being stopped: ask the workers to stop, keep their files for the next run
            for r in pending:
                ray.cancel(r)
            ray.wait(pending, num_returns=len(pending), timeout=10)
        merged = merge_worker_ledgers(ledger, folder, delete=not pending)
    if error is not None:
        raise error
    per = [{"worker": r["worker"], "pid": r["pid"], "host": r["host"], "stopped": r["stopped"],
            **{f: sum(st.get(f, 0) for st in r["stages"].values()) for f in ("calls", "failed", "usd")}}
           for r in sorted(results, key=lambda r: r["worker"])]
    return {"workers": n, "cluster": ray.get_runtime_context().gcs_address, "sent_to_workers": total,
            "calls": sum(p["calls"] for p in per), "failed": sum(p["failed"] for p in per),
            "usd": sum(p["usd"] for p in per), "budget_usd_per_worker": usd,
            "budget_stopped": sum(p["stopped"] is not None for p in per), "merged_calls": merged,
            "leftover_merged": leftover, "wall_s": round(time.perf_counter() - t0, 3), "per_worker": per}

"""Stage 2: the teacher labels the task's inputs (and the gold inputs, for evaluation).

Every call goes through the ledger: answered requests are read back, only new ones are sent, and each
answer is committed as it arrives. The teacher also answers the gold *inputs* here — gold labels are
never read in this stage — so that evaluate can score teacher and student on the same items.

Batch calibration (Zhao et al. 2021, "Calibrate Before Use"): a small prompted LM prefers some labels
regardless of input. We divide each item's distribution by the mean distribution over the unlabelled
pool and renormalise. The calibration vector is fitted on unlabelled inputs only and stored in the
artifact, then applied unchanged to the gold inputs.
"""

from __future__ import annotations

import hashlib
import statistics
from collections import Counter
from pathlib import Path

import numpy as np

from protege.kinds import kind_of
from protege.artifacts import fingerprint, is_fresh, stage_writer
from protege.data import data_file, load_gold, load_inputs, write_json, write_jsonl
from protege.teachers.ledger import BudgetExceeded, Ledger, request_key
from protege.progress import bar
from protege.stages.keys import GENERATE
from protege.task import TaskSpec
from protege.teachers.base import Answer, Teacher
from protege.registry import make_teacher


def shard_of(item_id: str, n: int) -> int:
    """Which of ``n`` shards an input belongs to: a stable hash of its id, the same on every machine."""
    return int(hashlib.sha256(item_id.encode("utf-8")).hexdigest()[:8], 16) % n


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (0-based ``i``) → ``(i, n)``; ValueError with the fix otherwise."""
    if not spec:
        return None
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard {spec!r}: write i/n, e.g. 0/4 for the first of four shards") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {spec!r}: need 0 <= i < n (shards are numbered from 0)")
    return i, n


def generate_fingerprint(task: TaskSpec) -> str:
    from protege.stages.active import active_key

    data_file(task, "inputs"), data_file(task, "gold")  # a missing file: one line naming the key, before hashing
    return GENERATE.key(task, extra=active_key(task))


# Failures where the model answered, but unusably (re-asks included): at the same settings a re-run would
# most likely buy the same answer again. Transport failures (rate limits, 5xx, timeouts, dropped
# connections, budget stops) are not in this set and are always retried.
CONTENT_FAILURES = ("not_a_label", "truncated", "bad_json", "schema_mismatch", "empty")


def label_with_ledger(teacher: Teacher, texts: list[str], ledger: Ledger, *, stage: str, samples: int = 1,
                      budget_usd: float | None = None, description: str = "teacher",
                      budget_tokens: int | None = None) -> tuple[list[list[Answer]], dict]:
    """Answers [item][sample] for ``texts``; cached calls are free, new ones are ledgered one by one.

    API teachers (``acall``) run ``teacher.concurrency`` calls at a time; local ones in batches. The
    budget — ``budget_usd``, and ``budget_tokens`` (default ``teacher.budget_tokens``) — is checked
    before each call is sent, counting calls in flight (:mod:`protege.teachers.calls`). When it stops the run,
    every answer received is in the ledger and :class:`BudgetExceeded` says how far the run got.
    Requests are rebuilt when sent rather than held, so a million inputs never sit in memory as prompts.

    Each call is leased in the ledger before it is sent (:mod:`protege.teachers.leases`): processes sharing the
    ledger never send the same request at once; one left to another process is read back when it lands.
    A teacher that cannot be reached raises :class:`~protege.teachers.calls.TeacherUnreachable` (stopping early).
    ``stats["truncated"]`` counts inputs cut to ``teacher.max_input_tokens``.
    """
    from protege.teachers.calls import BudgetGate, Tally, TeacherUnreachable, send_async, send_batched, unreachable_message
    from protege.teachers.leases import Leases

    n = len(texts)
    if budget_tokens is None:
        budget_tokens = getattr(teacher.cfg, "budget_tokens", None)
    keys = [[request_key(teacher.name, teacher.request(t, s), s) for s in range(samples)] for t in texts]
    flat = [k for ks in keys for k in ks]
    cached = ledger.lookup(flat)
    if teacher.cfg.retry_failed == "transient":  # unusable answers are not bought twice
        failed = ledger.lookup_failed([k for k in flat if k not in cached], CONTENT_FAILURES)
    else:
        failed = {}
    out: list[list[Answer | None]] = [[None] * samples for _ in range(n)]
    todo = []
    for i in range(n):
        for s in range(samples):
            hit = cached.get(keys[i][s])
            if hit is not None:
                out[i][s] = Answer.from_json(hit)
            elif keys[i][s] in failed:
                f = failed[keys[i][s]]
                out[i][s] = Answer(label=None, status="error", error=f["error"],
                                   extra={"reason": f["reason"], "from_ledger": True, "requests": 0})
            else:
                todo.append((i, s))
    del cached
    truncated = getattr(teacher, "truncated", None)
    stats = {"requests": n * samples, "cache_hits": n * samples - len(todo), "calls": 0, "failed": 0, "usd": 0.0,
             "failed_kept": sum(k in failed for k in flat),  # unusable answers from an earlier run, not re-sent
             "truncated": sum(map(truncated, texts)) if truncated else 0}  # inputs cut to max_input_tokens
    gate = BudgetGate(ledger, budget_usd, budget_tokens)
    run_id = ledger.start_run(stage, teacher.name, n * samples, stats["cache_hits"])
    leases = Leases(ledger)
    with bar(description, n * samples) as advance:
        tally = Tally(n, samples, todo, stats["cache_hits"], gate, advance)
        advance(stats["cache_hits"], **tally.fields())

        def on_answer(i: int, s: int, req: dict, ans: Answer) -> None:
            extra = ans.extra or {}
            ok = ans.status == "ok"
            with ledger.transaction():  # the outcome and giving back the lease: one commit
                ledger.record(keys[i][s], model=teacher.name, stage=stage, request=req,
                              response=dict(vars(ans)) if ok else None, status=ans.status, error=ans.error, sample=s,
                              tokens_in=ans.tokens_in, tokens_out=ans.tokens_out, cost_usd=ans.cost_usd,
                              latency_s=ans.latency_s, reason=None if ok else (extra.get("reason") or "error"),
                              requests=int(extra.get("requests", 1)), reasks=len(extra.get("reasks", ())))
                leases.release(keys[i][s])
            out[i][s] = ans
            tally.add(i, ans)
            down = tally.down()
            if down:
                left = n * samples - tally.cache_hits - tally.calls - tally.failures.get("over_budget", 0)
                raise TeacherUnreachable(unreachable_message(teacher.cfg, down[0], down[1], tally.calls, down[2],
                                                             not_sent=left))

        class _Claims:  # lease each call before it is sent; take answers other processes recorded meanwhile
            def claim(self, i: int, s: int, since: float | None) -> str:
                got, payload = leases.claim(keys[i][s], since)
                if got == "ok":
                    out[i][s] = Answer.from_json(payload)
                elif got == "failed":
                    out[i][s] = Answer(label=None, status="error", error=payload["error"],
                                       extra={"reason": payload["reason"], "from_ledger": True, "requests": 0})
                else:
                    return got
                tally.add_elsewhere(i)
                return "done"

        status = "interrupted"
        leases.start()
        try:
            if hasattr(teacher, "acall"):
                stop = send_async(teacher, texts, todo, gate, on_answer, teacher.cfg.concurrency, _Claims())
            else:
                bs = max(1, teacher.cfg.concurrency * 2 if getattr(teacher, "concurrent", False) else teacher.cfg.batch_size)
                stop = send_batched(teacher, texts, todo, gate, on_answer, bs, _Claims())
            status = "budget" if stop else "done"
        except TeacherUnreachable:
            status = "unreachable"
            raise
        finally:
            leases.stop()
            stats.update(calls=tally.calls, failed=tally.failed, usd=tally.usd, failures=dict(tally.failures),
                         items_done=tally.items_done, cache_hits=tally.cache_hits, answered_elsewhere=tally.elsewhere,
                         leases_taken_over=leases.taken_over)
            ledger.finish_run(run_id, status, calls=tally.calls, failed=tally.failed, usd=tally.usd,
                              note=locals().get("stop"))
    down = tally.down(finished=True)
    if down and not stop:
        raise TeacherUnreachable(unreachable_message(teacher.cfg, down[0], down[1], tally.calls, down[2]))
    if stop:
        left = n * samples - stats["cache_hits"] - stats["calls"]
        err = BudgetExceeded(
            f"{stop}. Stage {stage!r} stopped cleanly after {stats['calls']} new calls: {tally.items_done} of {n} "
            f"items done ({stats['failed']} calls failed, {stats['cache_hits']} answers from the ledger), {left} calls "
            f"not sent")
        err.stats = stats  # type: ignore[attr-defined]
        raise err
    return out, stats  # type: ignore[return-value]


def summarise(answers: list[Answer], labels: list[str], calib: np.ndarray | None) -> dict:
    """Combine an item's samples: mean (calibrated) distribution, majority label, agreement rate."""
    ok = [a for a in answers if a.status == "ok" and a.label is not None]
    if not ok:
        err = next((a.error for a in answers if a.error), "no answer")
        return {"label": None, "probs": None, "confidence": 0.0, "agreement": 0.0, "status": "error", "error": err,
                "soft": "none"}
    P = np.array([a.probs if a.probs is not None else [float(lab == a.label) for lab in labels] for a in ok], dtype=float)
    if calib is not None:
        P = P / calib
        P = P / P.sum(1, keepdims=True)
    votes = Counter(labels[int(p.argmax())] for p in P)
    majority, n_major = votes.most_common(1)[0]
    mean = P.mean(0)
    return {"label": majority, "probs": [round(float(x), 6) for x in mean], "confidence": float(mean.max()),
            "agreement": n_major / len(ok), "samples": len(ok), "status": "ok", "error": None, "soft": ok[0].soft,
            "missing_mass": float(np.mean([a.missing_mass for a in ok])),
            **({"sample_labels": [a.label if a.status == "ok" else None for a in answers]} if len(answers) > 1 else {})}


def generate(task: TaskSpec, out: Path, *, force: bool = False, shard: tuple[int, int] | None = None,
             ray: str | None = None) -> Path:
    """Label inputs and gold inputs with the teacher; write ``<out>/generate``. Returns that folder.

    ``shard=(i, n)`` labels only the inputs (and gold inputs) whose id hashes to shard ``i`` of ``n``
    and writes ``<out>/generate-shard-<i>of<n>``, never a partial ``generate``: run one shard per
    machine, ``protege ledger merge`` the ledgers, then an unsharded run answers everything from the
    merged ledger (zero calls) and writes the full artifact.

    ``ray`` (a cluster address, "" for the default) or ``teacher.engine: ray``: the calls are sent by workers on
    a Ray cluster first (:mod:`protege.stages.generate_ray`), then read back here from the merged ledger.
    """
    if task.generate.strategy == "active":  # rounds of the least-sure inputs: protege.stages.active
        from protege.stages.active import generate_active

        if shard is not None or not kind_of(task).labelled:
            raise ValueError("generate.strategy: active is for kind: classify, unsharded; use strategy: random")
        if ray is not None or task.teacher.engine == "ray":  # rounds of ~100 calls, each waiting on a refit
            raise ValueError("generate.strategy: active does not run on Ray (each round labels one small batch, "
                             "then refits the student before choosing the next); drop --ray / teacher.engine: ray, "
                             "or use strategy: random on Ray")
        return generate_active(task, out, fp=generate_fingerprint(task), label_with_ledger=label_with_ledger,
                               summarise=summarise, write_artifact=_write_artifact, teacher_timing=teacher_timing,
                               force=force)
    stage_dir = Path(out) / ("generate" if shard is None else f"generate-shard-{shard[0]}of{shard[1]}")
    fp = generate_fingerprint(task) if shard is None else fingerprint([generate_fingerprint(task), list(shard)])
    if not force and is_fresh(stage_dir, fp):
        return stage_dir
    inputs, gold = load_inputs(task), load_gold(task)
    if shard is not None:
        inputs = [r for r in inputs if shard_of(r["id"], shard[1]) == shard[0]]
        gold = [r for r in gold if shard_of(r["id"], shard[1]) == shard[0]]
    text = not kind_of(task).labelled
    if text:
        from protege.teachers.textgen import TextTeacher

        teacher = TextTeacher(make_teacher(task), task)
    else:
        teacher = make_teacher(task)
    ledger = Ledger(Path(out) / "ledger.sqlite")
    try:
        ray_stats = None
        if ray is not None or task.teacher.engine == "ray":  # the calls go out on Ray; below reads them back
            from protege.stages.generate_ray import label_on_ray

            ray_stats = label_on_ray(task, teacher, ledger, [("generate", [r["text"] for r in inputs], task.teacher.samples),
                                     ("gold", [r["text"] for r in gold], 1)], label=label_with_ledger,
                                     kept_reasons=CONTENT_FAILURES, address=ray or task.teacher.ray_address)
        pool, pool_stats = label_with_ledger(teacher, [r["text"] for r in inputs], ledger, stage="generate",
                                             samples=task.teacher.samples, budget_usd=task.teacher.budget_usd,
                                             description="teacher: label inputs")
        if ray_stats is not None:
            pool_stats["ray"] = ray_stats
        held, gold_stats = label_with_ledger(teacher, [r["text"] for r in gold], ledger, stage="gold",
                                             samples=1, budget_usd=task.teacher.budget_usd,
                                             description="teacher: gold inputs")
        if text:  # a local model's generation is timed here; an API teacher's latency comes from the ledger
            local = not hasattr(teacher.inner, "acall")
            timing = teacher_timing(teacher, ledger, [r["text"] for r in gold[: task.evaluate.n_single]],
                                    single=teacher.time_generation if local else False)
        else:
            timing = teacher_timing(teacher, ledger, [r["text"] for r in gold[:8]])
    except BudgetExceeded as e:
        cap = "teacher.budget_tokens" if str(e).startswith("token budget") else "teacher.budget_usd"
        raise BudgetExceeded(f"{e}. Calls made so far are in {ledger.path} and will not be repaid; raise "
                             f"{cap} in the task file and run again to continue.") from None
    finally:
        ledger.close()
        teacher.close()

    if text:
        return _write_text(task, stage_dir, fp, shard, inputs, gold, pool, held, pool_stats, gold_stats, timing,
                           teacher)
    calib = None
    if task.teacher.calibrate:
        raw = [a.probs for item in pool for a in item if a.status == "ok" and a.probs is not None]
        if raw:
            calib = np.mean(np.array(raw), axis=0)
    train_rows = [{"id": r["id"], "text": r["text"], **summarise(a, task.labels, calib)} for r, a in zip(inputs, pool)]
    gold_rows = [{"id": r["id"], **summarise(a, task.labels, calib)} for r, a in zip(gold, held)]
    stats = {
        "n_inputs": len(inputs), "n_gold_inputs": len(gold), "samples": task.teacher.samples,
        "inputs": pool_stats, "gold": gold_stats,
        "failed_items": sum(r["status"] != "ok" for r in train_rows),
        "calibration": None if calib is None else [float(x) for x in calib],
        "label_counts": dict(Counter(r["label"] for r in train_rows if r["label"])),
        "soft_labels": dict(Counter(r["soft"] for r in train_rows)),  # logprobs / logits / hard (fallback) / none
        "timing": timing, "teacher": teacher.display_name, "teacher_id": teacher.name,
    }
    topk = [next((a.extra.get("topk") for a in item if a.status == "ok" and (a.extra or {}).get("topk")), None)
            for item in pool]
    if shard is not None:
        stats["shard"] = list(shard)
    return _write_artifact(task, stage_dir, fp, train_rows, gold_rows, stats, topk)


def _write_artifact(task: TaskSpec, stage_dir: Path, fp: str, train_rows: list[dict], gold_rows: list[dict],
                    stats: dict, topk: list) -> Path:
    """The generate folder, atomically: train / gold answers, stats, and the per-token top-k log-probs
    for token-level KD when there are any (classify: row i = train row i; text tasks: ``topk_row``)."""
    with stage_writer(stage_dir, {"stage": "generate", "fingerprint": fp, "task": task.name}) as tmp:
        write_jsonl(tmp / "train.jsonl", train_rows)
        write_jsonl(tmp / "gold.jsonl", gold_rows)
        write_json(tmp / "stats.json", stats)
        if any(t is not None for t in topk):
            from protege.teachers.topk_store import save_topk

            save_topk(tmp / "topk.safetensors", topk)
    return stage_dir


def _write_text(task: TaskSpec, stage_dir: Path, fp: str, shard, inputs, gold, pool, held, pool_stats, gold_stats,
                timing, teacher) -> Path:
    """The generate artifact of an extract / generate task: ``output`` text per row; each row with stored
    top-k log-probs names its row in ``topk.safetensors`` (``topk_row``)."""
    from protege.teachers.textgen import best_topk, summarise_text

    train_rows, topk = [], []
    for r, a in zip(inputs, pool):
        row = {"id": r["id"], "text": r["text"], **summarise_text(a, task.kind)}
        t = best_topk(a, row["output"]) if row["status"] == "ok" else None
        row["topk_row"] = len(topk) if t is not None else None
        if t is not None:
            topk.append(t)
        train_rows.append(row)
    gold_rows = [{"id": r["id"], **summarise_text(a, task.kind)} for r, a in zip(gold, held)]
    stats = {
        "kind": task.kind, "n_inputs": len(inputs), "n_gold_inputs": len(gold), "samples": task.teacher.samples,
        "inputs": pool_stats, "gold": gold_stats,
        "failed_items": sum(r["status"] != "ok" for r in train_rows),
        "with_topk": len(topk), "soft_labels": dict(Counter(r["soft"] for r in train_rows)),
        "finish_reasons": dict(Counter(str(r.get("finish_reason")) for r in train_rows if r["status"] == "ok")),
        "timing": timing, "teacher": teacher.display_name, "teacher_id": teacher.name,
    }
    if shard is not None:
        stats["shard"] = list(shard)
    return _write_artifact(task, stage_dir, fp, train_rows, gold_rows, stats, topk)


def teacher_timing(teacher: Teacher, ledger: Ledger, texts: list[str], single=None) -> dict:
    """Teacher latency measured now, on this machine (``single(texts)`` → seconds per item: a local model
    answering one item at a time; default ``teacher.time_single``; ``False``: don't time), else the ledger's
    latency per call (API teachers)."""
    # only this stage's calls: baseline runs of the same model (variants, zero-shot) share the ledger
    batched = ledger.latencies(teacher.name, "generate") + ledger.latencies(teacher.name, "gold")
    out = {"batched_s_per_item": statistics.median(batched) if batched else None, "source": "ledger"}
    if single is None:
        single = getattr(teacher, "time_single", None)
    if single and texts:
        single(texts[:1])  # warm-up
        secs = single(texts)
        out.update(single_s_p50=statistics.median(secs), single_s=secs, source="measured")
    elif batched:
        out.update(single_s_p50=statistics.median(batched), source="ledger latency per call")
    return out

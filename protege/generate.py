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

import statistics
import time
from collections import Counter
from pathlib import Path

import numpy as np

from .artifacts import fingerprint, is_fresh, stage_writer
from .data import load_gold, load_inputs, write_json, write_jsonl
from .ledger import BudgetExceeded, Ledger, request_key
from .progress import bar
from .task import TaskSpec
from .teachers.base import Answer, Teacher, make_teacher


def file_signature(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime": int(st.st_mtime)}


def generate_fingerprint(task: TaskSpec) -> str:
    sig = {
        "teacher": task.teacher.model_dump(exclude={"budget_usd", "concurrency", "timeout_s", "max_retries"}),
        "instruction": task.instruction, "labels": task.labels, "examples": [e.model_dump() for e in task.examples],
        "input_field": task.input_field, "gold_field": task.gold_field,
        "data": task.data.model_dump(exclude={"train"}),
        "files": [file_signature(task.path(task.data.inputs)), file_signature(task.path(task.data.gold))],
    }
    return fingerprint(sig)


def label_with_ledger(teacher: Teacher, texts: list[str], ledger: Ledger, *, stage: str, samples: int = 1,
                      budget_usd: float | None = None, description: str = "teacher") -> tuple[list[list[Answer]], dict]:
    """Answers [item][sample] for ``texts``; cached calls are free, new ones are ledgered one by one."""
    n = len(texts)
    reqs = [[teacher.request(t, s) for s in range(samples)] for t in texts]
    keys = [[request_key(teacher.name, r, s) for s, r in enumerate(rs)] for rs in reqs]
    flat_keys = [k for ks in keys for k in ks]
    cached = ledger.lookup(flat_keys)
    out: list[list[Answer | None]] = [[None] * samples for _ in range(n)]
    todo = []
    for i in range(n):
        for s in range(samples):
            hit = cached.get(keys[i][s])
            if hit is not None:
                out[i][s] = Answer.from_json(hit)
            else:
                todo.append((i, s))
    stats = {"requests": n * samples, "cache_hits": n * samples - len(todo), "calls": 0, "failed": 0, "usd": 0.0}
    bs = max(1, teacher.cfg.batch_size if teacher.cfg.backend == "hf" else teacher.cfg.concurrency * 2)
    t0 = time.perf_counter()
    with bar(description, n * samples) as advance:
        advance(stats["cache_hits"], cached=stats["cache_hits"])
        for b in range(0, len(todo), bs):
            chunk = todo[b : b + bs]
            batch_reqs = [reqs[i][s] for i, s in chunk]
            if budget_usd is not None:
                ledger.check_budget(budget_usd, sum(teacher.estimate_cost(r) for r in batch_reqs))
            answers = teacher.answer(batch_reqs)
            for (i, s), req, ans in zip(chunk, batch_reqs, answers):
                ledger.record(keys[i][s], model=teacher.name, stage=stage, request=req,
                              response=ans.to_json() if ans.status == "ok" else None, status=ans.status,
                              error=ans.error, sample=s, tokens_in=ans.tokens_in, tokens_out=ans.tokens_out,
                              cost_usd=ans.cost_usd, latency_s=ans.latency_s)
                out[i][s] = ans
                stats["calls"] += 1
                stats["failed"] += ans.status != "ok"
                stats["usd"] += ans.cost_usd
            rate = stats["calls"] / max(1e-9, time.perf_counter() - t0)
            advance(len(chunk), cached=stats["cache_hits"], calls_per_s=f"{rate:.1f}", usd=f"{stats['usd']:.4f}")
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
            "missing_mass": float(np.mean([a.missing_mass for a in ok]))}


def generate(task: TaskSpec, out: Path, *, force: bool = False) -> Path:
    """Label inputs and gold inputs with the teacher; write ``<out>/generate``. Returns that folder."""
    stage_dir = Path(out) / "generate"
    fp = generate_fingerprint(task)
    if not force and is_fresh(stage_dir, fp):
        return stage_dir
    inputs, gold = load_inputs(task), load_gold(task)
    teacher = make_teacher(task)
    ledger = Ledger(Path(out) / "ledger.sqlite")
    try:
        pool, pool_stats = label_with_ledger(teacher, [r["text"] for r in inputs], ledger, stage="generate",
                                             samples=task.teacher.samples, budget_usd=task.teacher.budget_usd,
                                             description="teacher: label inputs")
        held, gold_stats = label_with_ledger(teacher, [r["text"] for r in gold], ledger, stage="gold",
                                             samples=1, budget_usd=task.teacher.budget_usd,
                                             description="teacher: gold inputs")
        timing = teacher_timing(teacher, ledger, [r["text"] for r in gold[:8]])
    except BudgetExceeded as e:
        raise BudgetExceeded(f"{e}. Calls made so far are in {ledger.path} and will not be repaid; raise "
                             f"teacher.budget_usd in the task file and run again to continue.") from None
    finally:
        ledger.close()
        teacher.close()

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
        "timing": timing, "teacher": teacher.display_name, "teacher_id": teacher.name,
    }
    with stage_writer(stage_dir, {"stage": "generate", "fingerprint": fp, "task": task.name}) as tmp:
        write_jsonl(tmp / "train.jsonl", train_rows)
        write_jsonl(tmp / "gold.jsonl", gold_rows)
        write_json(tmp / "stats.json", stats)
    return stage_dir


def teacher_timing(teacher: Teacher, ledger: Ledger, texts: list[str]) -> dict:
    """Teacher latency measured now, on this machine: single-item for local models, ledger for APIs."""
    batched = ledger.latencies(teacher.name)
    out = {"batched_s_per_item": statistics.median(batched) if batched else None, "source": "ledger"}
    if hasattr(teacher, "time_single") and texts:
        teacher.time_single(texts[:1])  # warm-up
        single = teacher.time_single(texts)
        out.update(single_s_p50=statistics.median(single), single_s=single, source="measured")
    elif batched:
        out.update(single_s_p50=statistics.median(batched), source="ledger latency per call")
    return out

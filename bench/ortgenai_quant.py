"""Which onnxruntime-genai builder quantization keeps a student's answers? Parcel extraction, one run.

    nice .venv/bin/python bench/ortgenai_quant.py --student /tmp/protege-genstudent/student \\
        i8a1b32:int8:accuracy_level=1:block_size=32 i8a4b32:int8:accuracy_level=4:block_size=32

Each variant ``tag:precision[:key=value...]`` is exported by the builder (``--extra_options key=value ...``)
into ``<student>/x-<tag>/`` (reused when there) and answers the same gold items, schema-constrained, one at a
time, with prompt-lookup drafts; each row says its p50 latency against the float32 export's (measured first,
in the same run), how many answers equal the float32 export's (which equal transformers' greedy answers:
bench/genstudent.py), field F1 against gold, the export's size, and up to 3 differing answers.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", required=True, help="a trained parcel student folder (bench/genstudent.py --work)")
    ap.add_argument("--items", default="200,50", help="skip,count of parcels.make(seed=7): 200,50 = genstudent's gold")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("variants", nargs="+", help="tag:precision[:key=value...]")
    args = ap.parse_args()

    from protege.kinds import kind
    from protege.students.causal_lm import CausalLMStudent
    from protege.students.ortgenai_build import build
    from protege.students.ortgenai_lm import OrtGenAIDecoder

    st = Path(args.student)
    n0, n = map(int, args.items.split(","))
    data = parcels.make(n0 + n, seed=7)[n0:]
    texts, golds = [d["text"] for d in data], [json.dumps(d["answer"]) for d in data]
    student = CausalLMStudent.from_pretrained(st)
    student.fields = list(parcels.FIELDS)
    ext = kind("extract")
    variants = {"fp32": ("fp32", [])}
    for spec in args.variants:
        tag, prec, *opts = spec.split(":")
        variants[tag] = (prec, opts)
    res = {}
    print(f"{n} items; {args.threads} threads; load avg {os.getloadavg()[0]:.1f}", flush=True)
    for tag, (prec, opts) in variants.items():
        folder = build(st, st / f"x-{tag}", prec, opts)  # reused when there
        student.fast = OrtGenAIDecoder(folder, student.tokenizer, tag, threads=args.threads, draft_tokens=6)
        student.generate(texts[:1], batch_size=1)  # warm-up
        outs, secs = [], []
        for t in texts:
            t0 = time.perf_counter()
            outs.append(student.generate([t], batch_size=1)[0]["text"])
            secs.append(time.perf_counter() - t0)
        res[tag] = (outs, secs)
        ref, r50, p50 = res["fp32"][0], statistics.median(res["fp32"][1]), statistics.median(secs)
        same = statistics.mean(ext.same_answer(a, b) for a, b in zip(outs, ref))
        f1 = float(ext.score(golds, outs)[0].mean())
        size = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
        print(f"{tag:16} {' '.join(opts) or '(defaults)':60} {size:5.0f} MB p50 {p50 * 1000:6.0f} ms "
              f"({p50 / r50:6.1%} of fp32) same {same:6.1%} F1 {f1:.3f} load {os.getloadavg()[0]:.1f}", flush=True)
        for i, a, b in [(i, a, b) for i, (a, b) in enumerate(zip(outs, ref)) if not ext.same_answer(a, b)][:3]:
            print(f"    item {i}: {a}\n    {'fp32':>{len(str(i)) + 5}}: {b}")


if __name__ == "__main__":
    main()

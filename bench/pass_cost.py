"""What one forward pass costs on this CPU, by tokens appended to a cached prompt: ONNX Runtime GenAI, per precision.

    python bench/pass_cost.py --student /tmp/protege-genstudent/student [--precisions fp32,int8,int4]

The student's ``ortgenai-<precision>/`` copies must exist (bench/genstudent.py builds them). For each precision a
175-token prefix is cached once; then, 7 times per size, the cache is rewound to it, N tokens are appended and the
logits read back (what a decode pass, a draft check or an item's prefill costs). Prints the p50 in ms per N: the
slope is what each appended token (a draft, a key, the item itself) adds, the intercept what a pass costs at all.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", required=True)
    ap.add_argument("--precisions", default="fp32,int8,int4")
    ap.add_argument("--sizes", default="1,2,4,8,16,32,45,64,80,100")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import onnxruntime_genai as og

    sizes = [int(x) for x in args.sizes.split(",")]
    print(f"{'precision':9} " + " ".join(f"{n:>6}" for n in sizes) + "   (appended tokens; p50 ms)")
    for prec in args.precisions.split(","):
        cfg = og.Config(f"{args.student}/ortgenai-{prec}")
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": args.threads, "inter_op_num_threads": 1}}}}))
        model = og.Model(cfg)
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=1024)
        gen = og.Generator(model, params)
        gen.append_tokens(np.arange(1000, 1175, dtype=np.int32))
        row = []
        for n in sizes:
            secs = []
            for _ in range(7):
                gen.rewind_to(175)
                t0 = time.perf_counter()
                gen.append_tokens(np.arange(2000, 2000 + n, dtype=np.int32))
                np.asarray(gen.get_output("logits"))
                secs.append(time.perf_counter() - t0)
            row.append(1000 * float(np.median(secs)))
        print(f"{prec:9} " + " ".join(f"{x:6.1f}" for x in row), flush=True)


if __name__ == "__main__":
    main()

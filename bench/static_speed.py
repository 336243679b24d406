"""Speed of the static student — old code, today's numpy path, today's compiled path — in one run on the demo's
BBC articles.

    nice .venv/bin/python bench/static_speed.py [--old-ref 34fcbe3] [--repeats 5] [--work /tmp/protege-static-speed]

Builds the demo data (``protege.demo.write_demo``), trains a static student on it once (256-d MiniLM static
embeddings + word 1–2-grams, the demo's student; labels from a keyword rule on the unlabelled inputs, so no
teacher and no gold label is needed — speed does not depend on what the labels are) and saves it. Then it
loads that one saved folder three times: with the current ``protege.students`` code (compiled path, and
numpy path with ``use_compiled = False``) and with the code at
``--old-ref`` (``git show`` into a temporary module, nothing in the checkout is touched), checks that all
give the same probabilities on the 426 gold articles, and times ``predict_proba`` the way the evaluate stage
does (``protege.timing.measure``: one call per item for p50/p95, the whole gold set in one call for
items/s), old and new interleaved, ``--repeats`` times; medians are printed with the load average, since
other processes may share the CPU — and, beside the wall-clock figures, the same calls in this process's
CPU time (``time.process_time``), which a busy machine distorts less (it still counts the cache misses and
shared cores that other processes cause).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protege import metrics as M  # noqa: E402
from protege.timing import measure  # noqa: E402

BASELINE = "34fcbe3"  # the last commit before the vectorised student
KEYWORDS = {
    "business": "shares profit market company firm economy bank sales growth prices",
    "entertainment": "film music album star singer award show band actor festival",
    "politics": "minister government election party labour tory mps vote blair parliament",
    "sports": "match game team cup win player coach season club injury",
    "tech": "software computer users mobile phone technology internet net digital online",
}


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def keyword_labels(texts: list[str], labels: list[str]) -> np.ndarray:
    words = {lab: set(KEYWORDS[lab].split()) for lab in labels}
    out = np.zeros((len(texts), len(labels)), dtype=np.float32)
    for i, t in enumerate(texts):
        toks = t.lower().split()
        c = np.array([sum(w in words[lab] for w in toks) for lab in labels], dtype=np.float32) + 0.5
        out[i] = np.exp(c - c.max()) / np.exp(c - c.max()).sum()
    return out


def build_student(work: Path) -> tuple[Path, list[str]]:
    """(saved student folder, gold texts) — the student is trained once and reused."""
    from protege.demo import write_demo
    from protege.task import load_task

    task = load_task(write_demo(work / "demo"))
    gold = [r["text"] for r in read_jsonl(work / "demo" / "gold.jsonl")]
    folder = work / "student"
    if not (folder / "config.json").is_file():
        from protege.students.classifier import StaticClassifier

        texts = [r["text"] for r in read_jsonl(work / "demo" / "inputs.jsonl")][: task.data.limit]
        t0 = time.perf_counter()
        s = task.student
        clf = StaticClassifier.from_encoder(s.embedder, task.labels, s.dims, ngrams=s.ngrams,
                                            ngram_min_df=s.ngram_min_df)
        clf.fit(texts, keyword_labels(texts, task.labels), dense_weight=s.dense_weight, max_iter=100)
        clf.scale_logits(0.9)
        clf.save_pretrained(folder)
        print(f"trained a static student on {len(texts)} demo inputs in {time.perf_counter() - t0:.1f}s -> {folder}")
    return folder, gold


def old_student_class(ref: str, tmp: Path):
    """``StaticClassifier`` as it was at git ``ref`` (its classifier.py + ngrams.py, loaded under new names)."""
    tag = "old_" + "".join(c for c in ref if c.isalnum())
    for name in ("classifier", "ngrams"):
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:protege/students/{name}.py"],
                             check=True, capture_output=True, text=True).stdout
        src = src.replace("from protege.students.ngrams import", f"from {tag}_ngrams import")
        (tmp / f"{tag}_{name}.py").write_text(src, encoding="utf-8")
    sys.path.insert(0, str(tmp))
    spec = importlib.util.spec_from_file_location(f"{tag}_classifier", tmp / f"{tag}_classifier.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.StaticClassifier


def cpu_time(fn, arg) -> float:
    """CPU seconds of one call (this process only: less sensitive than wall time to other processes)."""
    t0 = time.process_time()
    fn(arg)
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old-ref", default=BASELINE, help="git revision of the old implementation")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n-single", type=int, default=200)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "protege-static-speed"))
    a = ap.parse_args()
    work = Path(a.work)
    folder, gold = build_student(work)

    from protege.students.classifier import StaticClassifier

    with tempfile.TemporaryDirectory() as tmp:
        Old = old_student_class(a.old_ref, Path(tmp))
        numpy_path = StaticClassifier.from_pretrained(folder)
        numpy_path.use_compiled = False
        students = {"old": Old.from_pretrained(folder), "numpy": numpy_path,
                    "new": StaticClassifier.from_pretrained(folder)}
        if not students["new"]._compiled():
            print("numba is not installed: 'new' is the numpy path too")
        p_old, p_np, p_new = (students[k].predict_proba(gold) for k in ("old", "numpy", "new"))
        single_new = np.concatenate([students["new"].predict_proba([t]) for t in gold])
        diff = float(max(np.abs(p_old - p_new).max(), np.abs(p_np - p_new).max()))
        diff1 = float(np.abs(p_old - single_new).max())
        same = bool((p_old.argmax(1) == p_new.argmax(1)).all() and (p_np.argmax(1) == p_new.argmax(1)).all())
        load0 = os.getloadavg()
        rows: dict[str, dict[str, list[float]]] = {k: {m: [] for m in ("p50", "p95", "ips", "cpu_p50", "cpu_ips")}
                                                   for k in students}
        for _ in range(a.repeats):
            for k, clf in students.items():
                single, batched = measure(clf.predict_proba, gold, n_single=a.n_single, repeats=3, warmup=4)
                lat = M.latency_summary(single)
                rows[k]["p50"].append(lat["p50_ms"])
                rows[k]["p95"].append(lat["p95_ms"])
                rows[k]["ips"].append(1.0 / batched)
                cpu_single = [cpu_time(clf.predict_proba, [t]) for t in gold[: a.n_single]]
                rows[k]["cpu_p50"].append(statistics.median(cpu_single) * 1000)
                c2 = time.process_time()
                clf.predict_proba(gold)
                rows[k]["cpu_ips"].append(len(gold) / max(time.process_time() - c2, 1e-9))
        load1 = os.getloadavg()

    med = {k: {m: statistics.median(v) for m, v in r.items()} for k, r in rows.items()}
    words = statistics.mean(len(t.split()) for t in gold)
    print(f"static student, demo gold set: {len(gold)} BBC articles, {words:.0f} words each on average; "
          f"old = git {a.old_ref}, numpy = working tree with use_compiled=False, new = working tree (compiled); median of {a.repeats} repeats "
          f"(single: {a.n_single} one-item calls; batched: all {len(gold)} in one call, median of 3)")
    print(f"same predictions: {same}; max |p_old - p_new| = {diff:.2e} batched, {diff1:.2e} one item at a time")
    print(f"{'':6}{'p50 ms':>10}{'p95 ms':>10}{'items/s batched':>18}   |  CPU time:{'p50 ms':>9}{'items/s':>10}")
    for k in students:
        print(f"{k:6}{med[k]['p50']:>10.3f}{med[k]['p95']:>10.3f}{med[k]['ips']:>18,.0f}   |  "
              f"{'':9}{med[k]['cpu_p50']:>9.3f}{med[k]['cpu_ips']:>10,.0f}")
    for ref in ("old", "numpy"):
        print(f"{'/' + ref:6}{med[ref]['p50'] / med['new']['p50']:>9.1f}x{med[ref]['p95'] / med['new']['p95']:>9.1f}x"
              f"{med['new']['ips'] / med[ref]['ips']:>17.1f}x   |  {'':9}"
              f"{med[ref]['cpu_p50'] / med['new']['cpu_p50']:>8.1f}x{med['new']['cpu_ips'] / med[ref]['cpu_ips']:>9.1f}x")
    print(f"load average (1/5/15 min) before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; "
          f"after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; cpus: {os.cpu_count()}; nice: {os.nice(0)}")
    print("all runs:", json.dumps({k: {m: [round(x, 4) for x in v] for m, v in r.items()} for k, r in rows.items()}))


if __name__ == "__main__":
    main()

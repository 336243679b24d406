"""A simulated strong teacher: an OpenAI-compatible chat-completions server on 127.0.0.1 that answers a
classification task from its gold labels, wrong on a set share of items — with *systematic* errors.

Why simulate: to measure the student side on many tasks, a teacher of known quality whose mistakes look
like a strong LLM's is enough, and it costs nothing. Uniform label noise would be unfair to the test —
any student averages it away — so the errors here have the two structures real teachers' errors have:

* **hard items**: a cheap model (character 2–4-gram TF-IDF + a logistic-loss linear model, 5-fold cross-validated
  on the task's own data, so every item is scored out of fold) gives each item a margin
  ``p(gold) - max p(other)``, and ``r`` is its rank among the task's items (0 = least sure, 1 = surest). An
  item's chance of being answered wrong is ``q = beta*eps + (1-beta)*sigmoid((m0 - r)/tau)`` (tau = 0.01),
  with ``m0`` solved so that the mean of ``q`` is the error rate ``eps`` (default 0.10; ``beta`` = 0.2 of
  the errors fall anywhere, the rest on the low-margin items). With tau this small the low-margin errors
  are nearly a threshold: the hardest ~8% of items are answered wrong *every time and for all similar
  inputs*, as a teacher with its own decision boundary would — errors a student copies rather than
  averages away (with a per-item coin flip on the hard items instead, students trained on the teacher
  beat it by 4–8 points on SMS spam, which says the noise was too easy, not that the students were good).
* **direction**: an item whose nearest other label (under the cheap model) is the more frequent of the pair
  counts as ``bias`` = 0.15 less sure when ranked, so errors lean toward the commoner label (a teacher
  under-calls rare labels: on SMS spam ~3/4 of its errors are missed spam). Symmetric flips on both sides of
  a boundary would cancel out in any student.
* **confusable labels**: a wrong answer is drawn from half the cheap model's cross-validated (soft) confusion row
  of the gold label, half the item's own out-of-fold distribution; the wrong answer is the top of that mix — so errors land
  on the label pairs the data itself confuses (SMS ham/spam, TREC ``ENTY:other``/``ENTY:termeq`` ...).

Everything is deterministic per item: the draws are hashes of (seed, normalised text).

**Soft labels.** Each answer comes with ``logprobs.content[0].top_logprobs``: the answer token at a
confidence that falls with the item's hardness (0.97 on easy items, ~0.55 on the hardest; 0.50–0.70 on
wrong answers), the runner-up (the gold label when the answer is wrong, else the most confusable label)
holding 80% of the rest, the other labels sharing what is left — a distribution peaked on the answer with
mass on the confusable label, as an LLM's is. Tokens are ``" " + label``; protege's openai teacher reads
them back with ``label_probs_from_top_logprobs``.

**Prompt -> item.** protege's openai teacher sends the instruction and "Answer with exactly one of: ..."
as the system turn, few-shot examples as user/assistant turns, and the input (``truncate_words``) as the
last user turn. The server looks the user turns up, last first, by normalised text; a truncated input is
found by its first 48 (or 12) words. The model name picks the task (one server can hold several);
an input that is not an item of the task gets a 400, so a mis-wired benchmark fails loudly.

    from bench.suite.tasks import load_task
    sim = SimulatedTeacher.for_task(load_task("sms-spam"))
    sim.label(["Free entry in 2 a wkly comp ..."])          # (labels, probs): what the server would answer
    base_url, stop = serve({sim.name: sim})                  # http://127.0.0.1:<port>/v1, model "sms-spam"

``python bench/suite/teacher.py --tasks sms-spam,trec-fine`` serves in its own process (prints
``PORT <n>`` and each teacher's realised accuracy on gold).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from fastapi import FastAPI, Request  # module level: FastAPI resolves the string annotations here
from fastapi.responses import JSONResponse

PREFIX_WORDS = (48, 12)


def norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _u(seed: int, what: str, key: str) -> float:
    """A uniform [0, 1) draw that depends only on (seed, what, key)."""
    h = hashlib.sha256(f"{seed}\x00{what}\x00{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def cheap_oof_probs(texts: Sequence[str], y: np.ndarray, n_labels: int, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold label probabilities [n, C] of a character 2–4-gram TF-IDF + logistic-loss linear model.

    Cheap on purpose (SGD, 20 epochs; the TF-IDF vocabulary is fitted once on all texts — unsupervised, so
    no label leaks across folds): ~10 s for 5k items and 47 labels on one core, where scikit-learn's
    L-BFGS logistic regression took ~150 s for the same out-of-fold accuracy."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import SGDClassifier
    from sklearn.model_selection import StratifiedKFold

    P = np.zeros((len(texts), n_labels))
    counts = np.bincount(y, minlength=n_labels)
    k = int(max(2, min(folds, counts[counts > 0].min())))
    texts = [t[:3000] for t in texts]  # long documents: the first ~500 words carry the topic; keeps the cost flat
    X = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, min_df=2, max_features=50_000,
                        dtype=np.float32).fit_transform(texts)
    for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed).split(texts, y):
        clf = SGDClassifier(loss="log_loss", alpha=2e-5, max_iter=20, tol=None, random_state=seed).fit(X[tr], y[tr])
        P[np.ix_(te, clf.classes_)] = clf.predict_proba(X[te])
    return P


class SimulatedTeacher:
    """Answers for one task's items (pool + gold), with systematic errors at rate ``error_rate``.

    ``items``: dicts with "text" and "label" (the truth the simulation starts from)."""

    def __init__(self, name: str, labels: list[str], items: Sequence[dict], *, error_rate: float = 0.10,
                 seed: int = 0, uniform_share: float = 0.2, tau: float = 0.01, bias: float = 0.15, cache_dir: str | Path | None = None,
                 oof_probs: np.ndarray | None = None):
        self.name, self.labels, self.seed = name, list(labels), seed
        self.error_rate, self.uniform_share, self.tau, self.bias = error_rate, uniform_share, tau, bias
        self.texts = [" ".join(r["text"].split()) for r in items]
        self.keys = [norm(t) for t in self.texts]
        lab_idx = {lab: k for k, lab in enumerate(self.labels)}
        self.gold = np.array([lab_idx[r["label"]] for r in items])
        self.P = oof_probs if oof_probs is not None else self._oof(cache_dir)
        self._build_index()
        self._simulate()

    @classmethod
    def for_task(cls, task, **kw) -> "SimulatedTeacher":
        """From a ``tasks.SuiteTask`` (pool + gold both answerable; cache under runs/suite/cache by default)."""
        kw.setdefault("cache_dir", Path("runs/suite/cache"))
        return cls(task.name, task.labels, task.pool + task.gold, **kw)

    # -- the simulation ------------------------------------------------------------------------

    def _oof(self, cache_dir) -> np.ndarray:
        h = hashlib.sha256(("\x01".join(self.labels) + "\x02" + "\x01".join(
            f"{k}\x00{g}" for k, g in zip(self.keys, self.gold))).encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"cheap-oof-{self.name}-{h}.npy" if cache_dir else None
        if path is not None and path.exists():
            return np.load(path)
        P = cheap_oof_probs(self.texts, self.gold, len(self.labels), seed=self.seed)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp.npy")
            np.save(tmp, P)
            tmp.replace(path)
        return P

    def _simulate(self) -> None:
        n, C = self.P.shape
        g, P = self.gold, self.P
        other = P.copy()
        other[np.arange(n), g] = -1
        self.margin = P[np.arange(n), g] - other.max(1)
        # direction: errors toward the more frequent label of the pair come first (a teacher under-calls rare
        # labels); symmetric flips around a boundary would cancel out in any student
        freq = np.bincount(g, minlength=C)
        toward = other.argmax(1)
        shift = np.sign(freq[toward] - freq[g]) * self.bias
        pred = P.argmax(1)
        conf = np.zeros((C, C))
        np.add.at(conf, (g, pred), 1)
        self.cheap_confusion = conf  # rows: gold, columns: the cheap model's out-of-fold answer
        eps, beta = self.error_rate, self.uniform_share

        # hardness by rank of the margin (0 = the cheap model's least sure item, 1 = its surest): independent
        # of how well calibrated the cheap model's probabilities are
        self.margin_rank = (np.argsort(np.argsort(self.margin - shift, kind="stable"), kind="stable") + 0.5) / n

        def q_of(m0: float) -> np.ndarray:
            return beta * eps + (1 - beta) / (1 + np.exp(-(m0 - self.margin_rank) / self.tau))

        lo, hi = -5.0, 5.0
        for _ in range(100):  # mean q rises with m0
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if q_of(mid).mean() < eps else (lo, mid)
        self.m0 = (lo + hi) / 2
        self.q = q_of(self.m0) if eps > 0 else np.zeros(n)
        hard = 1 / (1 + np.exp(-(self.m0 - self.margin_rank) / self.tau))
        self.answer_idx = g.copy()
        self.probs = np.zeros((n, C))
        # soft confusion: summed out-of-fold probabilities per gold label (informative even where the cheap
        # model's hard answers are never wrong)
        off_conf = np.zeros((C, C))
        np.add.at(off_conf, g, P)
        off_conf += 1e-3
        for i in range(n):
            gi, key = g[i], self.keys[i]
            r = 0.5 * off_conf[gi] / (off_conf[gi].sum() - off_conf[gi, gi]) + 0.5 * (P[i] + 1e-4) / (1 - P[i, gi] + 1e-4 * C)
            r[gi] = 0.0
            r = r / r.sum()
            wrong = C > 1 and _u(self.seed, "wrong", key) < self.q[i]
            if wrong:  # the most confusable label for this item: the same mistake for similar inputs
                a = int(np.argmax(r))
                runner, p_a = gi, 0.5 + 0.2 * _u(self.seed, "conf", key)
            else:
                a, runner, p_a = gi, int(np.argmax(r)), 0.97 - 0.42 * hard[i]
            self.answer_idx[i] = a
            p = np.zeros(C)
            p[a] = p_a
            rest = 1 - p_a
            if C == 2:
                p[runner] += rest
            else:
                p[runner] += 0.8 * rest
                spread = r.copy()
                spread[[a, runner]] = 0
                if spread.sum() <= 0:
                    spread = np.ones(C)
                    spread[[a, runner]] = 0
                p += 0.2 * rest * spread / spread.sum()
            self.probs[i] = p

    # -- lookup --------------------------------------------------------------------------------

    def _build_index(self) -> None:
        self.index: dict[str, int] = {}
        self.prefix: dict[tuple[int, str], int | None] = {}
        for i, k in enumerate(self.keys):
            self.index.setdefault(k, i)
            words = k.split()
            for n in PREFIX_WORDS:
                if len(words) > n:
                    pk = (n, " ".join(words[:n]))
                    self.prefix[pk] = None if pk in self.prefix and self.prefix[pk] != i else i

    def find(self, text: str) -> int | None:
        """The item a (possibly truncated) input is, or None."""
        k = norm(text)
        if k in self.index:
            return self.index[k]
        words = k.split()
        for n in PREFIX_WORDS:
            if len(words) >= n:
                i = self.prefix.get((n, " ".join(words[:n])))
                if i is not None:
                    return i
        return None

    def label(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """What the server answers for each text: (labels, probs [n, C] over ``self.labels``)."""
        idx = []
        for t in texts:
            i = self.find(t)
            if i is None:
                raise KeyError(f"{self.name}: not an item of the task: {t[:80]!r}")
            idx.append(i)
        return [self.labels[self.answer_idx[i]] for i in idx], self.probs[idx]

    # -- reports -------------------------------------------------------------------------------

    def accuracy(self, rows: Sequence[dict]) -> float:
        """Realised accuracy of the answers on ``rows`` ({"text", "label"}), e.g. the gold set."""
        answers, _ = self.label([r["text"] for r in rows])
        return float(np.mean([a == r["label"] for a, r in zip(answers, rows)]))

    def error_structure(self, top: int = 5) -> dict:
        """Realised error rate, the commonest (gold -> answer) error pairs, and how the error rate rises on items
        the cheap model finds hard (lowest-margin quarter vs the rest)."""
        wrong = self.answer_idx != self.gold
        pairs: dict[tuple[str, str], int] = {}
        for i in np.flatnonzero(wrong):
            k = (self.labels[self.gold[i]], self.labels[self.answer_idx[i]])
            pairs[k] = pairs.get(k, 0) + 1
        q25 = np.quantile(self.margin, 0.25)
        hard = self.margin <= q25
        top_pairs = sorted(pairs.items(), key=lambda kv: -kv[1])[:top]
        return {"error_rate": float(wrong.mean()), "n_errors": int(wrong.sum()),
                "top_pairs": [{"gold": a, "answer": b, "n": n} for (a, b), n in top_pairs],
                "top_pairs_share": float(sum(n for _, n in top_pairs) / max(1, wrong.sum())),
                "error_rate_hardest_quarter": float(wrong[hard].mean()),
                "error_rate_rest": float(wrong[~hard].mean()),
                "cheap_model_accuracy": float((self.P.argmax(1) == self.gold).mean())}


# -- the server ----------------------------------------------------------------------------------

def _lp(token: str, p: float) -> dict:
    return {"token": token, "logprob": math.log(max(p, 1e-12)), "bytes": list(token.encode())}


def create_app(teachers: dict[str, SimulatedTeacher], *, latency_s: float = 0.0) -> FastAPI:
    """An OpenAI-compatible app serving each teacher under its task name as the model id."""
    app = FastAPI(title="protege simulated teacher")
    stats = {"calls": 0, "answered": 0, "unknown_item": 0, "unknown_model": 0}
    lock = threading.Lock()
    app.state.stats = stats

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "bench"} for n in teachers]}

    @app.get("/stats")
    async def get_stats():
        return dict(stats)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        with lock:
            stats["calls"] += 1
        if latency_s:
            await asyncio.sleep(latency_s)
        model = body.get("model")
        sim = teachers.get(model) or (next(iter(teachers.values())) if len(teachers) == 1 else None)
        if sim is None:
            with lock:
                stats["unknown_model"] += 1
            return JSONResponse({"error": {"message": f"model {model!r} not found; serving {sorted(teachers)}",
                                           "type": "invalid_request_error", "code": "model_not_found"}}, status_code=404)
        messages = body.get("messages") or []
        users = [m.get("content") for m in messages if m.get("role") == "user"]
        users = [c if isinstance(c, str) else "".join(p.get("text", "") for p in c or []) for c in users]
        i = next((j for j in (sim.find(u) for u in reversed(users)) if j is not None), None)
        if i is None:
            with lock:
                stats["unknown_item"] += 1
            return JSONResponse({"error": {"message": f"simulated teacher {sim.name}: the input is not an item of the "
                                           "task", "type": "invalid_request_error"}}, status_code=400)
        a = sim.labels[sim.answer_idx[i]]
        token = " " + a
        lp = None
        if body.get("logprobs"):
            k = int(body.get("top_logprobs") or 0)
            order = np.argsort(-sim.probs[i], kind="stable")[:k]
            top = [_lp(" " + sim.labels[j], float(sim.probs[i, j])) for j in order if sim.probs[i, j] > 0]
            lp = {"content": [{**_lp(token, float(sim.probs[i, sim.answer_idx[i]])), "top_logprobs": top}]}
        pt = sum(len(str(m.get("content") or "").split()) + 4 for m in messages)
        with lock:
            stats["answered"] += 1
        return {"id": f"chatcmpl-sim-{stats['calls']}", "object": "chat.completion", "created": int(time.time()),
                "model": sim.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": a}, "logprobs": lp,
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": pt, "completion_tokens": 1, "total_tokens": pt + 1}}

    return app


def serve(teachers: dict[str, SimulatedTeacher], *, port: int = 0, latency_s: float = 0.0):
    """Serve on 127.0.0.1 in a daemon thread; return (base_url ending in /v1, stop)."""
    from protege.serve.local_lm import serve_in_thread

    return serve_in_thread(create_app(teachers, latency_s=latency_s), port=port)


if __name__ == "__main__":
    import argparse
    import json
    import logging
    import sys

    import uvicorn

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tasks import TASKS, load_task

    ap = argparse.ArgumentParser(description="Serve simulated teachers for suite tasks on 127.0.0.1.")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--error-rate", type=float, default=0.10)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0)
    a = ap.parse_args()
    sims = {}
    for n in a.tasks.split(","):
        t = load_task(n)
        sims[n] = SimulatedTeacher.for_task(t, error_rate=a.error_rate)
        print(json.dumps({"task": n, "teacher_gold_accuracy": sims[n].accuracy(t.gold), **sims[n].error_structure()}),
              flush=True)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    server = uvicorn.Server(uvicorn.Config(create_app(sims, latency_s=a.latency), host="127.0.0.1", port=a.port,
                                           log_level="warning", lifespan="off"))

    def report():
        while not server.started:
            time.sleep(0.01)
        print(f"PORT {server.servers[0].sockets[0].getsockname()[1]}", flush=True)

    threading.Thread(target=report, daemon=True).start()
    server.run()

"""Exact and near-duplicate inputs, with MinHash LSH (``datasketch``) and an exact Jaccard check.

Why it matters for distillation: a duplicated input is trained on twice (the teacher's label on it
counts double), and a training input that is a near-copy of a gold input leaks the evaluation — the
student looks better on gold than it will on traffic. BBC-style corpora carry such copies (the same
story filed twice with a changed headline).

Similarity is the Jaccard index of word 3-gram sets ("shingles") of normalised text. MinHash LSH only
proposes candidate pairs in ~linear time; each candidate is then confirmed with the exact Jaccard of
its shingle sets, so the result does not depend on hashing luck near the threshold (only a pair LSH
fails to propose can be missed, with probability that falls steeply above the threshold).
"""

from __future__ import annotations

import re
from typing import Sequence

_WORD = re.compile(r"\w+", re.UNICODE)


def normalise(text: str) -> str:
    """Case-folded words joined by single spaces: the key for exact-duplicate checks."""
    return " ".join(_WORD.findall(text.casefold()))


def shingles(text: str, n: int = 3) -> frozenset[str]:
    """Word n-grams of the normalised text; texts shorter than n words give their one full n-gram."""
    words = _WORD.findall(text.casefold())
    if len(words) <= n:
        return frozenset([" ".join(words)]) if words else frozenset()
    return frozenset(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _minhash(sh: frozenset[str], num_perm: int):
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm, seed=1)
    if sh:
        m.update_batch([s.encode("utf-8") for s in sorted(sh)])
    return m


def _lsh(threshold: float, num_perm: int):
    from datasketch import MinHashLSH

    # LSH tuned a little below the threshold, so pairs just above it are proposed with high probability;
    # the exact Jaccard check removes the extra candidates this lets in.
    return MinHashLSH(threshold=max(0.05, threshold - 0.1), num_perm=num_perm)


def exact_duplicates(texts: Sequence[str]) -> list[int | None]:
    """For each text, the index of an earlier text with the same normalised form, else None."""
    first: dict[str, int] = {}
    out: list[int | None] = []
    for i, t in enumerate(texts):
        k = normalise(t)
        out.append(first.get(k))
        first.setdefault(k, i)
    return out


def near_duplicates(texts: Sequence[str], threshold: float, *, num_perm: int = 128,
                    keep: Sequence[bool] | None = None) -> list[tuple[int, float] | None]:
    """For each text, (index of an earlier *kept* text with Jaccard ≥ threshold, its Jaccard), else None.

    Greedy in order: a text that is a near-duplicate is not itself indexed, so a chain a~b~c keeps a
    and drops b and c only if each is close to a. ``keep=False`` entries are skipped entirely (neither
    compared nor indexed) — for rows an earlier filter already dropped.
    """
    lsh = _lsh(threshold, num_perm)
    sets: dict[int, frozenset[str]] = {}
    out: list[tuple[int, float] | None] = []
    for i, t in enumerate(texts):
        if keep is not None and not keep[i]:
            out.append(None)
            continue
        sh = shingles(t)
        m = _minhash(sh, num_perm)
        best = None
        for j in lsh.query(m):
            s = jaccard(sh, sets[j])
            if s >= threshold and (best is None or s > best[1] or (s == best[1] and j < best[0])):
                best = (j, s)
        out.append(best)
        if best is None:
            sets[i] = sh
            lsh.insert(i, m)
    return out


def overlaps(texts: Sequence[str], reference: Sequence[str], threshold: float | None, *,
             num_perm: int = 128) -> list[tuple[int, float] | None]:
    """For each text, (index into ``reference``, Jaccard) of its closest reference text at or above
    ``threshold`` — exact normalised copies always count (Jaccard 1.0) — else None."""
    exact = {normalise(r): j for j, r in enumerate(reference)}
    lsh, ref_sets = None, []
    if threshold is not None and reference:
        lsh = _lsh(threshold, num_perm)
        for j, r in enumerate(reference):
            sh = shingles(r)
            ref_sets.append(sh)
            lsh.insert(j, _minhash(sh, num_perm))
    out: list[tuple[int, float] | None] = []
    for t in texts:
        j = exact.get(normalise(t))
        if j is not None:
            out.append((j, 1.0))
            continue
        best = None
        if lsh is not None:
            sh = shingles(t)
            for j in lsh.query(_minhash(sh, num_perm)):
                s = jaccard(sh, ref_sets[j])
                if s >= threshold and (best is None or s > best[1]):
                    best = (j, s)
        out.append(best)
    return out

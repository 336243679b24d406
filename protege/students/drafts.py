"""Drafts for exact speculative decoding: tokens that probably come next, proposed without running a model.

A decoder appends a draft after the tokens it has and scores them all in one forward pass, keeping the draft up to
the first token greedy decoding would not have chosen; a wrong draft costs no extra pass, a right one saves one per
token. Extraction copies much of its answer from the input, so the input is where drafts come from:
:func:`lookup_draft` matches the answer's last token n-gram in the prompt, :func:`text_draft` matches the current
value as text (for a copy that the answer tokenises differently from the prompt). Pure functions, no runtime.
"""

from __future__ import annotations

from typing import Sequence


def lookup_draft(seq: Sequence[int], source: Sequence[int], k: int, max_ngram: int = 3, min_ngram: int = 2,
                 words: Sequence[str] | None = None) -> list[int]:
    """Prompt lookup: the ``k`` tokens that followed the latest occurrence in ``source`` of the longest tail
    n-gram of ``seq`` (``max_ngram`` down to ``min_ngram`` tokens); [] when none occurs. With ``words`` (each
    token's text without its leading space, by id), a last token of 2+ characters also matches its spaced twin
    in ``source``: a value's first token (``PK`` after ``"``) is spelled `` PK`` in the prompt."""
    for n in range(min(max_ngram, len(seq)), min_ngram - 1, -1):
        tail = list(seq[-n:])
        for i in range(len(source) - n - 1, -1, -1):
            if list(source[i:i + n]) == tail:
                return list(source[i + n:i + n + k])
    if words is not None and seq:
        w = words[seq[-1]]
        if len(w) >= 2:
            for i in range(len(source) - 2, -1, -1):
                if words[source[i]] == w:
                    return list(source[i + 1:i + 1 + k])
    return []


def text_draft(value: str, source_text: str, k: int, tokenize, min_chars: int = 1) -> list[int]:
    """Prompt lookup on *text*: the tokens of what followed the latest occurrence of ``value`` (the answer's
    current value so far, ``min_chars`` or more) in ``source_text``, at most ``k``. Token n-grams miss a copy
    whose tokens differ between the prompt and the answer — `` Dublin`` is one token after a space in the
    notice, ``Dub`` + ``lin`` after a quote in the JSON — while the text matches either way."""
    if len(value) < min_chars or k <= 0:
        return []
    i = source_text.rfind(value)
    if i < 0:
        return []
    if len(value) < 3:  # a short value: prefer its latest occurrence at the start of a word
        j = max(source_text.rfind(c + value) for c in " \n\t(\"'")
        i = j + 1 if j >= 0 else i
    rest = source_text[i + len(value): i + len(value) + 8 * k]
    return list(tokenize(rest))[:k] if rest else []

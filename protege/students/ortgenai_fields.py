"""Schema-constrained extraction on :class:`~protege.students.ortgenai_lm.OrtGenAIDecoder`: keys, quotes and
separators appended, only values decoded, with the next key and whole guessed answers riding on the passes that
decode them (the module docstring there says why each trick pays).

A mixin: the decoder brings the cache (``_feed``), greedy decoding (``_greedy``), tokenising (``_tokens``) and the
value memory; this side spells the answer and reads each value as JSON (``json_string_value``), so a value with
an escaped quote (``15\\" screen``) goes on past it: only an unescaped quote ends a value.
"""

from __future__ import annotations

import json
import math
from typing import Sequence

import numpy as np

from protege.students.lm_tokens import json_string_body, json_string_value


def logprob(row: np.ndarray, t: int) -> float:
    """log softmax(row)[t]."""
    m = float(row.max())
    return float(row[t]) - m - math.log(float(np.exp(row - m).sum()))


class FieldDecoding:
    """``_fields`` (greedy, with drafts) and ``_verified`` (a drafter's answer checked in one pass) for
    ``decode_fields``."""

    @staticmethod
    def _key(answer: str, k: int, name: str) -> str:
        return answer + ("" if k == 0 else ", ") + json.dumps(name, ensure_ascii=False) + ': "'

    def _ends(self, seq: list[int]) -> bool:
        """Whether value tokens ``seq`` (after its opening quote) are finished: the last is a stop token, or a
        token holding an unescaped quote (``\\"`` is the value's own quote, not its end)."""
        return bool(seq) and seq[-1] in self.quote_ends and (seq[-1] in self.stop_ids or self._value(seq)[1])

    def _value(self, seq: list[int]) -> tuple[str, bool]:
        """A value from its tokens (up to the closing quote, escapes decoded), and whether the quote was reached."""
        return json_string_value(self.tok.decode(seq, skip_special_tokens=True))

    @staticmethod
    def _close(answer: str, value: str) -> str:
        return answer + json_string_body(value) + '"'

    def _fields(self, p: list[int], answer: str, fields: Sequence[str], start: int, max_value_tokens: int,
                cands: dict[str, list[str]] | None = None) -> list:
        """``(value, closed, tokens, log-probs)`` of ``fields[start:]``, decoded one after another after ``answer``;
        ``cands``: candidate values per field (whole-answer drafts, ``_guess``)."""
        got, cands = [], cands or {}
        for k in range(start, len(fields)):
            answer = self._key(answer, k, fields[k])
            base = p + self._tokens(answer)
            seen = self.value_lengths.setdefault(fields[k], set())
            follow = (self._follow(p, answer, base, fields, k + 1, seen, cands)
                      if self.fold_keys and k + 1 < len(fields) else None)
            guess = self._guess(p, answer, base, fields, k, cands) if cands.get(fields[k]) else None
            seq, lps = self._greedy(base, max_value_tokens, self.quote_ends, p, follow, guess, opened=len(base))
            value, closed = self._value(seq)
            if closed:
                seen.add(len(seq) - 1)
            answer = self._close(answer, value)
            got.append((value, closed, seq, lps))
        return got

    def _chain(self, answer: str, fields: Sequence[str], k: int, cands: dict[str, list[str]]) -> str:
        """``answer`` (closed up to field ``k``) continued with field ``k``'s key and first candidate, and so on, up
        to the key of the first field without a candidate (or the closing brace)."""
        for j in range(k, len(fields)):
            answer = self._key(answer, j, fields[j])
            if not cands.get(fields[j]):
                return answer
            answer = self._close(answer, cands[fields[j]][0])
        return answer + "}"

    def _guess(self, p: list[int], answer: str, base: list[int], fields: Sequence[str], k: int,
               cands: dict[str, list[str]]):
        """``guess`` for field ``k`` (tokens ``base``): the first candidate that extends the value decoded so far,
        closed and followed by ``_chain`` — as tokens after ``ids``, when they tokenise with ``ids`` as their start."""
        def guess(ids: list[int]) -> list[int]:
            value = self._value(ids[len(base):])[0]  # as the candidates are stored: escapes decoded
            tries = (self._after(p, ids, self._chain(self._close(answer, c), fields, k + 1, cands))
                     for c in [c for c in cands[fields[k]] if c.startswith(value)][:3])
            return next((rest for rest in tries if rest), [])
        return guess

    def _after(self, p: list[int], ids: list[int], answer: str) -> list[int]:
        """The tokens of ``answer`` (after prompt ``p``) that follow ``ids``, if it tokenises with ``ids`` first; else []."""
        nxt = p + self._tokens(answer)
        return nxt[len(ids):] if nxt[:len(ids)] == ids else []

    def _follow(self, p: list[int], answer: str, base: list[int], fields: Sequence[str], k: int, seen: set[int],
                cands: dict[str, list[str]]):
        """``follow`` for a value started after ``answer`` (tokens ``base``): the rest of the next field's prefix,
        tokenised as ``_fields`` will tokenise it, when that tokenisation keeps ``ids`` as its start (else []).

        Every appended token costs (its logits row: ~1.2 ms for a 135M model on 2 cores, a fifth of a one-token
        pass), so the key is appended only where the value plausibly ends: after a copied draft (cut at its word's
        end), or at a length this field's values have had before (``seen``; any length until one is seen). Dates
        of 10 tokens get it at the tenth, not at every digit."""
        def follow(ids: list[int], drafted: bool) -> list[int]:
            if not drafted and seen and len(ids) - len(base) not in seen:
                return []
            value = self.tok.decode(ids[len(base):], skip_special_tokens=True)
            if '"' in value or "\\" in value:
                return []
            return self._after(p, ids, self._chain(self._close(answer, value), fields, k, cands))
        return follow

    def _verified(self, p: list[int], fields: Sequence[str], max_value_tokens: int, cands: dict) -> list:
        """``_fields`` with the drafter proposing every remaining value at once: the answer its values spell is
        appended in one pass, and each field is read off that pass's logits for as long as greedy decoding
        (what ``_fields`` would feed and choose) agrees with it; at the first disagreement that field is
        finished by ``_greedy`` and the drafter proposes the rest again."""
        self.drafter.quote_ends = self.quote_ends
        answer, got = "{", []
        while len(got) < len(fields):
            k = len(got)
            full = answer
            for j, (value, *_rest) in enumerate(self.drafter._fields(p, answer, fields, k, max_value_tokens, cands)):
                full = self._close(self._key(full, k + j, fields[k + j]), value)
            x = p + self._tokens(full)
            first = len(p) + len(self._tokens(self._key(answer, k, fields[k])))
            rows = self._feed(x, first - 1)
            while len(got) < len(fields):
                key = self._key(answer, len(got), fields[len(got)])
                t_ = p + self._tokens(key)
                seq, lps, done, i = [], [], False, len(t_)
                while x[:len(t_)] == t_:  # greedy tokens read off the pass while they are x's
                    seq.append(int(rows[i - first].argmax()))
                    lps.append(logprob(rows[i - first], seq[-1]))
                    done = self._ends(seq) or len(seq) >= max_value_tokens
                    if done or i >= len(x) or x[i] != seq[-1]:
                        break
                    i += 1
                if not done:
                    more, more_lps = self._greedy(t_ + seq, max_value_tokens - len(seq), self.quote_ends, p,
                                                  opened=len(t_))
                    seq, lps = seq + more, lps + more_lps
                value, closed = self._value(seq)
                answer = self._close(key, value)
                got.append((value, closed, seq, lps))
                if not done:
                    break  # the drafts after a disagreement followed a different answer: propose again
        return got

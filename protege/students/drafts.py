"""Drafts for exact speculative decoding: tokens that probably come next, proposed without running a model.

A decoder appends a draft after the tokens it has and scores them all in one forward pass, keeping the draft up to
the first token greedy decoding would not have chosen; a wrong draft costs no extra pass, a right one saves one per
token. Extraction copies much of its answer from the input, so the input is where drafts come from:
:func:`lookup_draft` matches the answer's last token n-gram in the prompt, :func:`text_draft` matches the current
value as text (for a copy that the answer tokenises differently from the prompt); :class:`ValueMemory` guesses
whole values of an extraction answer from what the training answers held. Pure functions, no runtime.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import Counter
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


# -- whole values: what a field's answer probably is, before decoding it ---------------------------------------
MONTHS = {m: i + 1 for i, m in enumerate(["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov",
                                          "dec"])}
MONTH_WORDS = set(MONTHS) | {"sept", "january", "february", "march", "april", "june", "july", "august", "september",
                             "october", "november", "december"}
_SPAN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._/-]*[A-Za-z0-9])?")
_MON = r"([A-Za-z]{3,9})\.?"
_SLASHED = re.compile(r"\b(\d{1,2})/(\d{1,2})/(\d{4})\b")  # 03/04/2025: day or month first, as a task spells it
_BOTH_WAYS = [(3, 2, 1), (3, 1, 2)]  # day first, month first (US)
_DATES = [  # (pattern, its readings: group order year, month, day; a month name or number)
    (re.compile(r"\b(\d{4})-(\d{1,2})-(\d{1,2})\b"), [(1, 2, 3)]),
    (re.compile(r"\b(\d{4})/(\d{1,2})/(\d{1,2})\b"), [(1, 2, 3)]),
    (_SLASHED, _BOTH_WAYS),
    (re.compile(r"\b(\d{1,2})\.(\d{1,2})\.(\d{4})\b"), _BOTH_WAYS),  # 12.3.2025: day first almost always
    (re.compile(r"\b(\d{1,2})(?:st|nd|rd|th)?\s+" + _MON + r",?\s+(\d{4})\b"), [(3, 2, 1)]),
    (re.compile(r"\b" + _MON + r"\s+(\d{1,2})(?:st|nd|rd|th)?,?\s+(\d{4})\b"), [(3, 1, 2)]),
]


def shape(value: str) -> str:
    """A value's character classes, lengths kept: ``PK-1234-567`` -> ``AA-9999-999``, ``2025-03-12`` -> ``9999-99-99``."""
    return re.sub(r"[a-z]", "a", re.sub(r"[A-Z]", "A", re.sub(r"[0-9]", "9", value)))


def _reading(g: tuple, y: int, m: int, d: int) -> str | None:
    """The ISO date that groups ``g`` spell when read as (year, month, day) = groups (y, m, d); None if impossible."""
    month = g[m - 1]
    month = int(month) if month.isdigit() else MONTHS.get(month[:3].lower()) if month.lower() in MONTH_WORDS else None
    try:
        return dt.date(int(g[y - 1]), month or 0, int(g[d - 1])).isoformat()
    except (TypeError, ValueError):
        return None


def iso_dates(text: str, month_first: bool = False) -> list[str]:
    """``YYYY-MM-DD`` for every date spelled in ``text`` (ISO, ``12/03/2025`` both ways round — day first unless
    ``month_first`` —, ``12.3.2025`` both ways, day first, ``12 March 2025``, ``Mar 12, 2025``), in order of
    appearance, without repeats; impossible dates dropped."""
    found: list[tuple[int, str]] = []
    for pat, readings in _DATES:
        for hit in pat.finditer(text):
            for r in (readings[::-1] if month_first and pat is _SLASHED else readings):
                if (iso := _reading(hit.groups(), *r)) is not None:
                    found.append((hit.start(), iso))
    return list(dict.fromkeys(v for _, v in sorted(found, key=lambda x: x[0])))


def month_first_votes(text: str, value: str) -> int:
    """+1 per ``dd/mm/yyyy``-style date in ``text`` that only its month-first reading turns into ``value``, -1 per one
    that only its day-first reading does (how a task's training pairs spell ambiguous dates)."""
    day_first, month_first = _BOTH_WAYS
    votes = 0
    for hit in _SLASHED.finditer(text):
        a, b = _reading(hit.groups(), *day_first), _reading(hit.groups(), *month_first)
        votes += (b == value != a) - (a == value != b)
    return votes


_QUANTITY = re.compile(r"(?<![\w./-])(\d+(?:\.\d+)?)\s?([A-Za-z]{1,6})\b")


def quantities(text: str) -> list[tuple[float, str]]:
    """``(number, unit)`` for every number written with a unit word after it (``500 g``, ``3 lbs``, ``2.5kg``)."""
    return [(float(m.group(1)), m.group(2).lower()) for m in _QUANTITY.finditer(text)]


def number_text(x: float, decimals: int, strip: bool) -> str:
    """``x`` with ``decimals`` decimals, trailing zeros (and a bare point) stripped if ``strip``."""
    s = f"{x:.{decimals}f}"
    return (s.rstrip("0").rstrip(".") or "0") if strip and "." in s else s


def occurs_as_word(value: str, text: str) -> bool:
    """Whether ``value`` occurs in ``text`` with no letter or digit right before or after it (``Oslo`` in ``to
    Oslo.``, not in ``Oslovakia``). Plain ``str.find``: no regex compiled per value."""
    i = text.find(value)
    while i >= 0:
        j = i + len(value)
        if (i == 0 or not text[i - 1].isalnum()) and (j == len(text) or not text[j].isalnum()):
            return True
        i = text.find(value, i + 1)
    return False


UNITS_TRIED = 20  # unit words per field whose factor is searched (the most frequent, each seen 3+ times)


class ValueMemory:
    """Values each field of an extraction answer has had (the teacher's answers the student trained on), and the
    candidates they suggest for a new input: whole-value drafts, checked by the model like any draft.

    For a field, in this order: the input's quantities converted as the training pairs convert them (``500 g``
    -> ``0.5`` where a field's values are kilograms: a factor per unit word and a number format, kept where they
    reproduce at least half of the 3 or more training answers that unit occurs in); its past values that occur in
    the input as words (a sender, a city); spans of the input with the exact shape of a past value (a tracking
    code ``AA999999999``); the ISO spellings of the input's dates, where the field's values are ISO dates (an
    ambiguous ``03/04/2025`` read first as the training pairs read such dates). A wrong candidate costs only the
    rows it adds to a forward pass; the answer is still the model's greedy answer.

    How much it saves depends on how predictable the values are: on bench/parcels.py's templated notices the first
    candidate is the gold value for every field, so there it is a best case."""

    def __init__(self, values: dict | None = None, factors: dict | None = None, formats: dict | None = None,
                 cap: int = 500, month_first: bool = False):
        self.cap = cap
        self.month_first = month_first  # ambiguous dates (03/04/2025) read month first: the training pairs did
        self.values: dict[str, Counter] = {f: Counter(v) for f, v in (values or {}).items()}
        self.shapes: dict[str, Counter] = {f: self._shapes(c) for f, c in self.values.items()}
        self.formats: dict[str, list] = dict(formats or {})  # field -> [decimals, strip trailing zeros]
        self.factors: dict[str, dict[str, float]] = {f: u for f, u in (factors or {}).items() if f in self.formats}

    @staticmethod
    def _shapes(values: Counter) -> Counter:
        out: Counter = Counter()
        for v, n in values.items():
            out[shape(v)] += n
        return out

    @classmethod
    def from_pairs(cls, inputs: Sequence[str], answers: Sequence[str]) -> "ValueMemory":
        """From (input, JSON-object answer) pairs; unparseable answers and non-string values are skipped."""
        if len(inputs) != len(answers):
            raise ValueError(f"{len(inputs)} inputs but {len(answers)} answers")
        mem, numeric, counts, votes = cls(), {}, Counter(), 0
        for text, a in zip(inputs, answers):
            text = str(text or "")
            try:
                obj = json.loads(a)
            except (TypeError, ValueError):
                continue
            if not isinstance(obj, dict):
                continue
            qs = quantities(text)
            for f, v in obj.items():
                if isinstance(v, str) and v:
                    f = str(f)
                    mem.remember(f, v)
                    counts[f] += 1
                    if qs and re.fullmatch(r"-?\d+(\.\d+)?", v):
                        numeric.setdefault(f, []).append((qs, v))
                    elif shape(v) == "9999-99-99":
                        votes += month_first_votes(text, v)
        for f, pairs in numeric.items():
            if 2 * len(pairs) >= counts[f]:  # a numeric field: most of its values are numbers
                mem._learn_units(f, pairs)
        mem.month_first = votes > 0
        return mem

    @classmethod
    def from_answers(cls, answers: Sequence[str]) -> "ValueMemory":
        return cls.from_pairs([""] * len(answers), answers)

    def _learn_units(self, field: str, pairs: list) -> None:
        """Per unit word (the :data:`UNITS_TRIED` most frequent, seen 3+ times), the factor (value / number) that
        reproduces the most answers exactly, with the number format that does; kept where it reproduces at least
        half of the answers that unit occurs in. At most 300 examples and 50 distinct ratios per unit."""
        decs = Counter(len(v.split(".")[1]) if "." in v else 0 for _, v in pairs)
        formats = [(d, strip) for d in range(min(max(decs), 6) + 1) for strip in (True, False)]
        seen = Counter(unit for qs, _ in pairs for x, unit in qs if x)
        units = {u for u, n in seen.most_common(UNITS_TRIED) if n >= 3}
        by_unit: dict[str, list] = {}
        for qs, v in pairs:
            for x, unit in qs:
                if x and unit in units and len(by_unit.setdefault(unit, [])) < 300:
                    by_unit[unit].append((x, v))
        best_fmt, best_n, best = None, 0, {}
        for fmt in formats:
            factors, n = {}, 0
            for unit, xs in by_unit.items():
                ratios = Counter(float(f"{float(v) / x:.6g}") for x, v in xs if float(v))
                tries = sorted({r for r, _ in ratios.most_common(50)} | {1.0})
                r, hits = max(((r, sum(number_text(x * r, *fmt) == v for x, v in xs)) for r in tries),
                              key=lambda t: t[1])
                if hits * 2 >= len(xs):
                    factors[unit], n = r, n + hits
            if n > best_n:
                best_fmt, best_n, best = fmt, n, factors
        if best_n > 0:
            self.factors[field], self.formats[field] = best, list(best_fmt)

    def remember(self, field: str, value: str) -> None:
        """Count ``value`` for ``field`` (as the answer's decoded string). Past ``2 * cap`` distinct values the
        ``cap`` most frequent are kept, the most recent first among equals."""
        c = self.values.setdefault(field, Counter())
        c[value] = c.pop(value, 0) + 1  # re-inserted: the order of ``c`` is recency
        self.shapes.setdefault(field, Counter())[shape(value)] += 1
        if len(c) > 2 * self.cap:
            kept = sorted(reversed(c.items()), key=lambda kv: -kv[1])[: self.cap]  # stable: recent first on ties
            self.values[field] = Counter(dict(reversed(kept)))
            self.shapes[field] = self._shapes(self.values[field])

    def candidates(self, field: str, text: str) -> list[str]:
        """Candidate values of ``field`` for the input ``text``, best first (the class docstring's order)."""
        return self.for_input([field], text)[field]

    def for_input(self, fields: Sequence[str], text: str) -> dict[str, list[str]]:
        """:meth:`candidates` of every field, with the input's quantities, spans and dates found once."""
        qs = spans = dates = None
        out = {}
        for field in fields:
            past, shapes = self.values.get(field), self.shapes.get(field)
            if not past:
                out[field] = []
                continue
            factors = self.factors.get(field, {})
            qs = quantities(text) if qs is None else qs
            got = [number_text(x * factors[u], *self.formats[field]) for x, u in qs if u in factors]
            got += sorted((v for v in past if v in text and occurs_as_word(v, text)), key=lambda v: (-len(v), -past[v]))
            spans = [m.group() for m in _SPAN.finditer(text)] if spans is None else spans
            got += sorted((s for s in spans if shape(s) in shapes), key=lambda s: -shapes[shape(s)])
            if shapes.get("9999-99-99"):
                dates = iso_dates(text, self.month_first) if dates is None else dates
                got += dates
            out[field] = list(dict.fromkeys(got))
        return out

    def to_json(self) -> dict:
        return {"values": {f: dict(c.most_common(self.cap)) for f, c in self.values.items()},
                "factors": self.factors, "formats": self.formats, "month_first": self.month_first}

    @classmethod
    def from_json(cls, d: dict) -> "ValueMemory":
        return cls(d.get("values"), d.get("factors"), d.get("formats"), month_first=bool(d.get("month_first")))

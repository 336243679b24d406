"""Whole-value drafts for constrained extraction (:class:`protege.students.drafts.ValueMemory`): what a field's
answer probably is, learned from training pairs. Pure functions; the decoder's use of them (same answers, fewer
passes) is tested in test_ortgenai_lm.py."""

from __future__ import annotations

import json
from collections import Counter

from protege.students.drafts import ValueMemory, iso_dates, number_text, quantities, shape


def test_shape_keeps_character_classes_and_lengths():
    assert shape("PK-1234-567") == "AA-9999-999" and shape("2025-03-12") == "9999-99-99"
    assert shape("Dublin") == "Aaaaaa"


def test_iso_dates_reads_the_common_spellings_both_ways_round_and_drops_impossible_ones():
    text = "sent 2025-1-2, due 03/04/2025, or 12 March 2026, Mar 5, 2025; 31.12.2025; not 45/13/2025"
    assert iso_dates(text) == ["2025-01-02", "2025-04-03", "2025-03-04", "2026-03-12", "2025-03-05", "2025-12-31"]
    assert iso_dates("no dates here, 12 apples 2025") == [] and iso_dates("Decisions 12, 2025") == []


def test_quantities_and_number_text():
    assert quantities("a 500 g box, 3 lbs, 2.5kg, code PK-177 from x") == [(500.0, "g"), (3.0, "lbs"), (2.5, "kg")]
    assert number_text(0.5, 2, True) == "0.5" and number_text(2.0, 2, True) == "2" and number_text(2.0, 1, False) == "2.0"


def _pairs(n: int = 40):
    """Weights written in g or kg, answered in kg (up to 2 decimals); a code; a city from a short list."""
    rows = []
    for i in range(n):
        grams = 100 + 37 * i
        unit_g = i % 2 == 0
        text = (f"Parcel ZX{100000 + i} of {grams} g to Lyon" if unit_g else
                f"Parcel ZX{100000 + i} of {grams / 1000:g} kg to Oslo")
        kg = f"{grams / 1000:.2f}".rstrip("0").rstrip(".")
        rows.append((text, json.dumps({"code": f"ZX{100000 + i}", "kg": kg, "city": "Lyon" if unit_g else "Oslo"})))
    return rows


def test_unit_factors_and_format_are_learned_from_pairs_and_reproduce_new_answers():
    mem = ValueMemory.from_pairs(*zip(*_pairs()))
    assert mem.factors["kg"] == {"g": 0.001, "kg": 1.0} and mem.formats["kg"] == [2, True]
    text = "Parcel ZX999999 of 1250 g to Oslo"
    assert mem.candidates("kg", text)[0] == "1.25"
    assert mem.candidates("code", text)[0] == "ZX999999"  # the span with a past code's shape
    assert mem.candidates("city", text)[0] == "Oslo"  # a past value found in the input, as a word
    assert mem.candidates("city", "to Oslovakia") == [] and mem.candidates("nope", text) == []


def test_a_unit_that_does_not_convert_consistently_is_not_kept():
    rows = [(f"{d} March: {w} kg", json.dumps({"kg": str(w)})) for d, w in ((d, (7 * d) % 23 + 1) for d in range(1, 20))]
    mem = ValueMemory.from_pairs(*zip(*rows))
    assert mem.factors["kg"] == {"kg": 1.0}  # "march" (the day before it) explains no answer


def test_dates_are_proposed_where_the_field_holds_iso_dates():
    mem = ValueMemory.from_answers([json.dumps({"date": "2025-01-02", "note": "x"})] * 3 + ["not json", "[1]"])
    assert mem.candidates("date", "arrives 4 Jan 2025") == ["2025-01-04"]
    assert mem.candidates("note", "arrives 4 Jan 2025") == []


def test_ambiguous_dates_are_read_first_as_the_training_pairs_read_them():
    assert iso_dates("on 03/04/2025", month_first=True) == ["2025-03-04", "2025-04-03"]
    assert iso_dates("on 3.4.2025", month_first=True) == ["2025-04-03", "2025-03-04"]  # dotted: day first still
    us = [("Delivered 03/04/2025", "2025-03-04"), ("Due 11/02/2026", "2026-11-02"), ("On 12/25/2025", "2025-12-25")]
    eu = [("Delivered 03/04/2025", "2025-04-03"), ("Due 11/02/2026", "2026-02-11"), ("On 25/12/2025", "2025-12-25")]
    for pairs, first in ((us, "2026-05-06"), (eu, "2026-06-05")):
        mem = ValueMemory.from_pairs([t for t, _ in pairs], [json.dumps({"date": v}) for _, v in pairs])
        assert mem.month_first == (pairs is us)  # 12/25 and 25/12 are no vote: one reading only
        assert mem.candidates("date", "arrives 05/06/2026")[0] == first
        back = ValueMemory.from_json(json.loads(json.dumps(mem.to_json())))
        assert back.candidates("date", "arrives 05/06/2026")[0] == first


def test_json_round_trip_and_memory_bounded():
    mem = ValueMemory.from_pairs(*zip(*_pairs()))
    back = ValueMemory.from_json(json.loads(json.dumps(mem.to_json())))
    text = "Parcel ZX5 of 300 g to Lyon"
    assert back.candidates("kg", text) == mem.candidates("kg", text) and back.values == mem.values
    small = ValueMemory(cap=3)
    for i in range(20):
        small.remember("f", f"v{i % 7}")
    assert len(small.values["f"]) <= 6 and "v5" in small.values["f"]  # the latest survives a trim
    assert small.shapes["f"] == Counter({"a9": sum(small.values["f"].values())})  # trimmed alike
    fresh = ValueMemory(cap=2)
    for v in ["a1", "a1", "b", "c", "d", "e"]:
        fresh.remember("f", v)
    assert set(fresh.values["f"]) == {"a1", "e"}  # the most frequent, then the most recent


def test_pairs_must_line_up_and_text_fields_learn_no_units():
    import pytest

    with pytest.raises(ValueError, match="2 inputs but 1 answers"):
        ValueMemory.from_pairs(["a", "b"], ["{}"])
    rows = [(f"{i} kg of apples", json.dumps({"note": f"apples {i}" if i % 3 else str(i)})) for i in range(30)]
    assert ValueMemory.from_pairs(*zip(*rows)).factors == {}  # "note" holds mostly text: no unit search

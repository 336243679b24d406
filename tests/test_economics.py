"""The verdict counts cost and latency: a student dearer per call than its teacher, or over the user's latency
budget, is not 'ship' — and the verdict says what would make it pay. No ratio prints as '0.0x faster'."""

from __future__ import annotations

import pytest

from protege.reporting.fmt import speed_words
from protege.stages.evaluate.economics import economics, gate, speed_phrase

SHIP = {"decision": "ship", "text": "Ship the student: it keeps 101.8% of the teacher's field_f1."}


def report(s_ms: float, t_usd: float, s_usd: float, speedup: float) -> dict:
    return {"student": {"ms_per_item": s_ms}, "speedup": speedup,
            "cost": {"teacher_usd_per_call": t_usd, "student_usd_per_call": s_usd}}


def test_a_student_dearer_than_its_teacher_is_not_shipped_and_says_what_would_pay():
    # the case: 5,425 ms per item at $0.10/hour = $150.7 per 1M calls against the API's $7.3
    r = report(5425.0, 7.3e-6, 5425 / 1000 * 0.10 / 3600, 0.3)
    v = gate(r, SHIP, max_ms=None, usd_per_hour=0.10)
    assert v["decision"] == "costs more" and v["quality"] == SHIP["text"]
    assert "$150.69 per 1M calls against the teacher's $7.30" in v["text"]
    assert "3.3x slower" in v["text"] and "never pays off" in v["text"]
    even_ms = 7.3e-6 * 3600 * 1000 / 0.10  # 262.8 ms per item breaks even at $0.10/hour
    assert f"{even_ms:,.1f} ms per item" in v["text"] and "$0.0048/hour" in v["text"]


def test_a_cheaper_student_keeps_its_quality_verdict():
    r = report(0.7, 6.3e-6, 0.7 / 1000 * 0.10 / 3600, 318)
    assert economics(r, max_ms=None, usd_per_hour=0.10) is None
    assert gate(r, SHIP, max_ms=None, usd_per_hour=0.10) == SHIP


def test_an_unpriced_teacher_is_no_reason_to_overrule_the_quality_verdict():
    r = report(3.0, 0.0, 1e-7, 2.0)  # a teacher with no known price: its calls are logged at $0
    assert gate(r, SHIP, max_ms=None, usd_per_hour=0.10) == SHIP


def test_over_the_latency_budget_is_not_shipped():
    r = report(12.0, 1e-3, 1e-9, 50)
    v = gate(r, SHIP, max_ms=5.0, usd_per_hour=0.10)
    assert v["decision"] == "too slow" and "12.0 ms" in v["text"] and "5 ms budget" in v["text"]
    assert gate(r, {"decision": "not yet", "text": "x"}, max_ms=5.0, usd_per_hour=0.1)["decision"] == "not yet"


@pytest.mark.parametrize("x, words", [(318.4, "318x faster"), (1.84, "1.8x faster"), (0.3, "3.3x slower"),
                                      (0.004, "250x slower"), (None, ""), (0.0, "")])
def test_speed_is_never_printed_as_zero_x_faster(x, words):
    assert speed_words(x) == words
    assert "0.0x" not in speed_phrase(x) and "0x faster" not in speed_phrase(x)

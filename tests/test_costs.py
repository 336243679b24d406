"""Break-even arithmetic against numbers worked out by hand, and the chart helper."""

from __future__ import annotations

import math

import pytest

from protege.costs import (break_even_figure, break_even_months, chart_months, compute_usd_per_call,
                           cumulative_costs, format_months, instance_usd_per_hour, monthly_saving, price_for,
                           token_cost_usd)

# By hand: gpt-4o-mini at $0.15 / $0.60 per 1M tokens, 500 tokens in and 10 out per call:
#   500 * 0.15e-6 + 10 * 0.60e-6 = 7.5e-5 + 6e-6 = 8.1e-5 $ per call.
# Student: 2 ms per call on a $0.36/hour instance: 0.002 s * 0.36 / 3600 = 2e-7 $ per call.
# At 200,000 calls a month: teacher 16.20 $/month, student 0.04 $/month, saving 16.16 $/month.
# One-off 40.40 $ (labelling + training) → 40.40 / 16.16 = 2.5 months.
TEACHER = 8.1e-5
STUDENT = 2e-7
VOLUME = 200_000
ONE_OFF = 40.40


def test_call_prices_by_hand():
    p_in, p_out = price_for("gpt-4o-mini-2024-07-18")  # dated snapshot finds its family, not "gpt-4o"
    assert (p_in, p_out) == (0.15, 0.60)
    assert token_cost_usd(500, 10, p_in, p_out) == pytest.approx(TEACHER, rel=1e-12)
    assert compute_usd_per_call(0.002, 0.36) == pytest.approx(STUDENT, rel=1e-12)
    assert price_for("my-local-model") == (0.0, 0.0)
    assert price_for("gpt-4o", 1.0, None) == (1.0, 10.0)  # one override, the other from the table


def test_break_even_by_hand():
    assert monthly_saving(TEACHER, STUDENT, VOLUME) == pytest.approx(16.16)
    assert break_even_months(TEACHER, STUDENT, VOLUME, ONE_OFF) == pytest.approx(2.5)
    # a serving floor of 6.16 $/month (an always-on box) leaves 10.00 $/month → 4.04 months
    assert break_even_months(TEACHER, STUDENT, VOLUME, ONE_OFF, fixed_usd_per_month=6.16) == pytest.approx(4.04)
    assert break_even_months(TEACHER, TEACHER, VOLUME, ONE_OFF) is None  # no saving: never
    assert break_even_months(TEACHER, STUDENT, VOLUME, ONE_OFF, fixed_usd_per_month=20.0) is None


def test_cumulative_costs_by_hand():
    c = cumulative_costs(6, TEACHER, STUDENT, VOLUME, ONE_OFF)
    assert c["months"] == [0, 1, 2, 3, 4, 5, 6]
    assert c["teacher_only"][0] == 0 and c["distilled"][0] == pytest.approx(ONE_OFF)
    assert c["teacher_only"][3] == pytest.approx(48.60)           # 3 * 16.20
    assert c["distilled"][3] == pytest.approx(40.40 + 3 * 0.04)    # 40.52
    assert c["teacher_only"][2] < c["distilled"][2] and c["teacher_only"][3] > c["distilled"][3]  # crosses at 2.5
    assert c["break_even_months"] == pytest.approx(2.5)
    assert c["monthly_saving"] == pytest.approx(16.16)
    # the two lines meet exactly at the break-even month
    be = c["break_even_months"]
    assert c["teacher_usd_per_month"] * be == pytest.approx(ONE_OFF + c["student_usd_per_month"] * be)
    with pytest.raises(ValueError):
        cumulative_costs(0, TEACHER, STUDENT, VOLUME, ONE_OFF)


def test_chart_and_wording():
    assert chart_months(2.5) == 12 and chart_months(10) == 20 and chart_months(100) == 60 and chart_months(None) == 12
    assert format_months(None) == "never" and format_months(math.inf) == "never"
    assert format_months(2.5) == "2.5 months" and format_months(31) == "2.6 years"
    assert format_months(0.5) == "15.2 days"
    c = cumulative_costs(chart_months(2.5), TEACHER, STUDENT, VOLUME, ONE_OFF)
    fig = break_even_figure(c)
    ax = fig.axes[0]
    assert len(ax.lines) == 3  # teacher, distilled, the break-even marker
    assert list(ax.lines[0].get_ydata()) == pytest.approx(c["teacher_only"])
    assert any("break-even: 2.5 months" in t.get_text() for t in ax.texts)
    never = break_even_figure(cumulative_costs(12, TEACHER, TEACHER, VOLUME, ONE_OFF))
    assert len(never.axes[0].lines) == 2 and not never.axes[0].texts


def test_instance_table():
    assert instance_usd_per_hour("cpu-2vcpu") == 0.10
    with pytest.raises(ValueError, match="unknown instance"):
        instance_usd_per_hour("no-such-box")

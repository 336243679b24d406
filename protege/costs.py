"""Prices and the break-even arithmetic.

The price table is list prices in USD per 1M tokens (input, output) as published by the providers in
2026; override per task with ``teacher.price_in_per_1m`` / ``price_out_per_1m`` — your contract price
is the one that matters. Matching is by longest model-name prefix, so dated snapshots
(``gpt-4o-2024-08-06``) find their family. The teachers price each call with :func:`price_for` when
they record it in the ledger, so the ledger's $ and the forecasts here come from one table.

Self-hosted models (a local teacher, the student) are priced by wall time: an instance's $/hour times
the seconds a call takes on it (:func:`compute_usd_per_call`). That is the cost at full utilisation;
an always-on machine that idles costs more per call, which ``fixed_usd_per_month`` in
:func:`cumulative_costs` accounts for.
"""

from __future__ import annotations

import math

PRICES_PER_1M: dict[str, tuple[float, float]] = {
    # OpenAI
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5": (1.25, 10.00),
    "o4-mini": (1.10, 4.40),
    "o3": (2.00, 8.00),
    # Anthropic
    "claude-3-5-haiku": (0.80, 4.00),
    "claude-haiku-4-5": (1.00, 5.00),
    "claude-sonnet-4": (3.00, 15.00),
    "claude-3-7-sonnet": (3.00, 15.00),
    "claude-opus-4": (15.00, 75.00),
    # Google
    "gemini-2.0-flash": (0.10, 0.40),
    "gemini-2.5-flash-lite": (0.10, 0.40),
    "gemini-2.5-flash": (0.30, 2.50),
    "gemini-2.5-pro": (1.25, 10.00),
}

# On-demand list prices, USD per hour, for machines a student is typically served from. Approximate
# (region and year vary): set ``student.usd_per_hour`` to what you pay.
INSTANCE_USD_PER_HOUR: dict[str, float] = {
    "cpu-2vcpu": 0.10,           # a small shared CPU VM: the demo's figure
    "aws-c7i.large": 0.089,      # 2 vCPU, 4 GB
    "aws-c7i.xlarge": 0.179,     # 4 vCPU, 8 GB
    "gcp-n2-standard-2": 0.097,  # 2 vCPU, 8 GB
    "aws-g5.xlarge": 1.006,      # 1x A10G 24 GB
    "aws-g6.xlarge": 0.805,      # 1x L4 24 GB
    "gcp-g2-standard-4": 0.707,  # 1x L4
    "h100-80gb": 2.99,           # 1x H100, typical GPU-cloud on-demand price
}

HOURS_PER_MONTH = 730.0  # 365 * 24 / 12


def price_for(model: str, price_in: float | None = None, price_out: float | None = None) -> tuple[float, float]:
    """(input, output) $ per 1M tokens: the task's override, else the table, else 0 (self-hosted)."""
    if price_in is not None and price_out is not None:
        return price_in, price_out
    name = model.lower().split("/")[-1]
    best = max((k for k in PRICES_PER_1M if name.startswith(k)), key=len, default=None)
    t_in, t_out = PRICES_PER_1M[best] if best else (0.0, 0.0)
    return (price_in if price_in is not None else t_in, price_out if price_out is not None else t_out)


def token_cost_usd(tokens_in: float, tokens_out: float, price_in_per_1m: float, price_out_per_1m: float) -> float:
    """$ of one call (or a mean call) from its token counts and per-1M-token prices."""
    return tokens_in * price_in_per_1m / 1e6 + tokens_out * price_out_per_1m / 1e6


def instance_usd_per_hour(name: str) -> float:
    """$ per hour of a named instance in :data:`INSTANCE_USD_PER_HOUR`; a clear error otherwise."""
    try:
        return INSTANCE_USD_PER_HOUR[name]
    except KeyError:
        raise ValueError(f"unknown instance {name!r}; known: {', '.join(sorted(INSTANCE_USD_PER_HOUR))} "
                         f"(or give the $/hour yourself)") from None


def compute_usd_per_call(seconds_per_call: float, usd_per_hour: float) -> float:
    """Self-hosted cost of one call: wall seconds on an instance that costs usd_per_hour."""
    return seconds_per_call * usd_per_hour / 3600


def monthly_saving(teacher_usd_per_call: float, student_usd_per_call: float, calls_per_month: float,
                   fixed_usd_per_month: float = 0.0) -> float:
    """$ saved per month by answering with the student instead of the teacher (negative: a loss)."""
    return (teacher_usd_per_call - student_usd_per_call) * calls_per_month - fixed_usd_per_month


def break_even_months(teacher_usd_per_call: float, student_usd_per_call: float, calls_per_month: int,
                      one_off_usd: float, fixed_usd_per_month: float = 0.0) -> float | None:
    """Months until the one-off cost (labelling + training) is paid back by cheaper calls; None if never."""
    saving = monthly_saving(teacher_usd_per_call, student_usd_per_call, calls_per_month, fixed_usd_per_month)
    if saving <= 0:
        return None
    return one_off_usd / saving


def cumulative_costs(months: int, teacher_usd_per_call: float, student_usd_per_call: float, calls_per_month: float,
                     one_off_usd: float, fixed_usd_per_month: float = 0.0) -> dict:
    """Cumulative $ by month for "keep calling the teacher" vs "distil once, serve the student".

    Month 0 is the day of the decision: the teacher-only line starts at 0, the distilled line at the
    one-off cost (labelling + training). The lines cross at ``break_even_months`` (None if they never
    do). ``fixed_usd_per_month`` is a serving floor for the student (e.g. one always-on instance:
    $/hour × 730) on top of its per-call cost.
    """
    if months < 1:
        raise ValueError(f"months must be ≥ 1, got {months}")
    teacher_month = teacher_usd_per_call * calls_per_month
    student_month = student_usd_per_call * calls_per_month + fixed_usd_per_month
    ms = list(range(months + 1))
    return {
        "months": ms,
        "teacher_only": [teacher_month * m for m in ms],
        "distilled": [one_off_usd + student_month * m for m in ms],
        "teacher_usd_per_month": teacher_month,
        "student_usd_per_month": student_month,
        "one_off_usd": one_off_usd,
        "monthly_saving": teacher_month - student_month,
        "break_even_months": break_even_months(teacher_usd_per_call, student_usd_per_call, calls_per_month,
                                               one_off_usd, fixed_usd_per_month),
    }


def chart_months(break_even: float | None, minimum: int = 12, maximum: int = 60) -> int:
    """A horizontal axis that shows the crossing with some room after it: 2x break-even, within bounds."""
    if break_even is None or not math.isfinite(break_even):
        return minimum
    return int(min(maximum, max(minimum, math.ceil(2 * break_even))))


def break_even_figure(curves: dict, *, title: str | None = None, ax=None):
    """Matplotlib figure of :func:`cumulative_costs`' output: the two cumulative lines and the crossing.

    Returns the Figure (the caller saves or embeds it). Pass ``ax`` to draw into an existing axes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(5.6, 3.2))
    else:
        fig = ax.figure
    m = curves["months"]
    ax.plot(m, curves["teacher_only"], color="#8c6bb1", lw=2, label="teacher only")
    ax.plot(m, curves["distilled"], color="#41ab5d", lw=2, label="distilled (one-off + student)")
    be = curves.get("break_even_months")
    if be is not None and be <= m[-1]:
        ax.axvline(be, color="grey", ls=":", lw=1)
        ax.text(0.98, 0.05, f"break-even: {format_months(be)}", transform=ax.transAxes, ha="right", va="bottom",
                fontsize=8, color="#333333", bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    ax.set_xlabel("months from now")
    ax.set_ylabel("cumulative cost (USD)")
    ax.set_xlim(0, m[-1])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.set_title(title or f"{curves['one_off_usd']:.2f} USD one-off; saves "
                          f"{curves['monthly_saving']:.2f} USD/month", fontsize=9)
    return fig


def format_months(m: float | None) -> str:
    """Human wording for a break-even time: 'never', '3 days', '2.5 months', '4.1 years'."""
    if m is None or not math.isfinite(m):
        return "never"
    if m < 1:
        days = m * 365 / 12
        if days < 1:
            return f"{days * 24:.1f} hours" if days * 24 >= 0.1 else "< 0.1 hours"
        return f"{days:.1f} days"
    if m < 24:
        return f"{m:.1f} months"
    return f"{m / 12:.1f} years"

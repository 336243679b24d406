"""Prices and the break-even arithmetic.

The price table is list prices in USD per 1M tokens (input, output) as published by the providers in
2026; override per task with ``teacher.price_in_per_1m`` / ``price_out_per_1m`` — your contract price
is the one that matters. Matching is by longest model-name prefix, so dated snapshots
(``gpt-4o-2024-08-06``) find their family.
"""

from __future__ import annotations

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


def price_for(model: str, price_in: float | None = None, price_out: float | None = None) -> tuple[float, float]:
    """(input, output) $ per 1M tokens: the task's override, else the table, else 0 (self-hosted)."""
    if price_in is not None and price_out is not None:
        return price_in, price_out
    name = model.lower().split("/")[-1]
    best = max((k for k in PRICES_PER_1M if name.startswith(k)), key=len, default=None)
    t_in, t_out = PRICES_PER_1M[best] if best else (0.0, 0.0)
    return (price_in if price_in is not None else t_in, price_out if price_out is not None else t_out)


def usd_per_1k_calls(usd_per_call: float) -> float:
    return usd_per_call * 1000


def compute_usd_per_call(seconds_per_call: float, usd_per_hour: float) -> float:
    """Self-hosted cost of one call: wall seconds on an instance that costs usd_per_hour."""
    return seconds_per_call * usd_per_hour / 3600


def break_even_months(teacher_usd_per_call: float, student_usd_per_call: float, calls_per_month: int,
                      one_off_usd: float) -> float | None:
    """Months until the one-off cost (labelling + training) is paid back by cheaper calls; None if never."""
    saving = (teacher_usd_per_call - student_usd_per_call) * calls_per_month
    if saving <= 0:
        return None
    return one_off_usd / saving

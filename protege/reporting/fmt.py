"""Number and text formatting shared by the report pages (html.py, ladder_html.py)."""

from __future__ import annotations

import html
import math


def _f(x, spec: str = ".3f", dash: str = "—") -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return dash
    return format(x, spec)


def _ci(ci, spec: str = ".3f") -> str:
    return f"[{_f(ci[0], spec)}, {_f(ci[1], spec)}]" if ci else ""


def _e(s) -> str:
    return html.escape(str(s))


def _money(x) -> str:
    """Dollars readable at any scale: $1,234.50, $0.0060, $0.0000035 (never 3.5e-06)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if x == 0 or abs(x) >= 1:
        return f"${x:,.2f}"
    digits = max(2, 1 - math.floor(math.log10(abs(x))))  # two significant digits
    return f"${x:.{digits}f}"


def _bytes(n) -> str:
    """1,234,567 → 1.2 MB."""
    if n is None:
        return "—"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def speed_words(speedup: float | None) -> str:
    """"230x faster" / "1.8x faster" / "3.2x slower" / "" (unknown)."""
    if not speedup or speedup <= 0:
        return ""
    x, word = (speedup, "faster") if speedup >= 1 else (1 / speedup, "slower")
    return f"{x:,.0f}x {word}" if x >= 10 else f"{x:.1f}x {word}"

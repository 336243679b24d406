"""The learning curve: how agreement with the teacher grows with the number of teacher labels, and what more
labels would buy.

Points come from the ladder's folds (the chosen rung fitted on 1/8, 1/4, 1/2, 1/1 of each training part,
scored on the held-out parts); the fit is the usual power law ``a - b · n^(-c)`` (a: the plateau).
:func:`expected_agreement` is pure, for the report and the verdict to import.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

FORM = "a - b * n**(-c)"


def _f(n, a, b, c):
    return a - b * np.power(n, -c)


def fit_curve(n: Sequence[float], agreement: Sequence[float]) -> dict:
    """``{"form", "a", "b", "c", "method"}`` fitted to the points; fewer than 3 usable points or a failed fit fall
    back to c = 0.5 with (a, b) by least squares, and one point to a flat line at it."""
    x = np.asarray(n, dtype=float)
    y = np.asarray(agreement, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0)
    x, y = x[ok], y[ok]
    if len(x) == 0:
        return {"form": FORM, "a": None, "b": None, "c": None, "method": "no points"}
    if len(x) == 1 or np.ptp(x) == 0:
        return {"form": FORM, "a": float(y.mean()), "b": 0.0, "c": 0.5, "method": "one point: flat"}
    if len(x) >= 3:
        try:
            from scipy.optimize import curve_fit

            (a, b, c), _ = curve_fit(_f, x, y, p0=(min(1.0, y.max() + 0.02), 1.0, 0.5),
                                     bounds=([0.0, 0.0, 0.05], [1.0, np.inf, 2.0]), maxfev=20000)
            return {"form": FORM, "a": float(a), "b": float(b), "c": float(c), "method": "curve_fit"}
        except Exception:  # noqa: BLE001 - a curve that will not fit falls back below
            pass
    c = 0.5
    A = np.stack([np.ones_like(x), -np.power(x, -c)], 1)
    (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
    b = max(float(b), 0.0)
    a = float(np.clip(np.mean(y + b * np.power(x, -c)), 0.0, 1.0))
    return {"form": FORM, "a": a, "b": b, "c": c, "method": "least squares, c fixed at 0.5"}


def expected_agreement(fit: dict, n: float) -> float | None:
    """Agreement with the teacher the fitted curve expects with ``n`` teacher labels (clipped to [0, 1])."""
    if not fit or fit.get("a") is None:
        return None
    return float(np.clip(_f(float(max(n, 1.0)), fit["a"], fit["b"], fit["c"]), 0.0, 1.0))

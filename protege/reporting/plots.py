"""The report's figures: each function takes report.json data and returns a PNG data URI.

PNG data URIs keep report.html one self-contained file (mail it, attach it to a ticket, open it
offline). Matplotlib runs on the Agg backend; every figure is closed after rendering.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np

TEACHER, STUDENT, CASCADE, GREY = "#7b61a8", "#2e9e5b", "#e08a1e", "#999999"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def to_data_uri(fig) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _ok(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def score_bars(series: list[tuple[str, str, float, list[float] | None]], title: str, colors: list[str] | None = None) -> str:
    """Horizontal bars with 95% CI whiskers: one bar per (group, name, value, ci)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 0.42 * len(series) + 0.9))
    ys = np.arange(len(series))[::-1]
    vals = [v for _, _, v, _ in series]
    lo = [v - ci[0] if ci and _ok(ci[0]) else 0 for _, _, v, ci in series]
    hi = [ci[1] - v if ci and _ok(ci[1]) else 0 for _, _, v, ci in series]
    colors = colors or [TEACHER if g == "teacher" else STUDENT for g, *_ in series]
    ax.barh(ys, vals, xerr=[lo, hi], color=colors, capsize=4, height=0.65, error_kw={"elinewidth": 1.2})
    for y, v, (_, _, _, ci) in zip(ys, vals, series):
        txt = f"{v:.3f}" + (f"  [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and _ok(ci[0]) else "")
        ax.text(0.01, y, txt, va="center", color="white", fontweight="bold", fontsize=8.5)
    ax.set_yticks(ys, [f"{n}" for _, n, _, _ in series])
    ax.set_xlim(0, 1)
    ax.set_xlabel(title)
    ax.grid(axis="x", alpha=0.3)
    return to_data_uri(fig)


def confusion_pair(mats: dict[str, list[list[int]]], labels: list[str]) -> str:
    """Teacher and student confusion matrices side by side (rows gold, columns predicted)."""
    plt = _plt()
    names = list(mats)
    arrays = [np.array(mats[n]) for n in names]
    invalid = any(a[:, -1].any() for a in arrays)
    cols = labels + ["(invalid)"] if invalid else labels
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names) + 0.4, 3.4))
    axes = np.atleast_1d(axes)
    vmax = max(a.max() for a in arrays)
    for ax, n, a in zip(axes, names, arrays):
        a = a if invalid else a[:, :-1]
        ax.imshow(a, cmap="Blues", vmin=0, vmax=vmax)
        ax.set_xticks(range(len(cols)), cols, rotation=40, ha="right")
        ax.set_yticks(range(len(labels)), labels if ax is axes[0] else [""] * len(labels))
        ax.set_xlabel("predicted")
        if ax is axes[0]:
            ax.set_ylabel("gold")
        ax.set_title(f"{n} vs gold")
        for i in range(a.shape[0]):
            for j in range(a.shape[1]):
                if a[i, j]:
                    ax.text(j, i, str(a[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if a[i, j] > vmax / 2 else "black")
    fig.tight_layout()
    return to_data_uri(fig)


def reliability(cal: dict[str, dict]) -> str:
    """Reliability diagram: accuracy per confidence bin vs the diagonal, bin counts underneath."""
    plt = _plt()
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(4.6, 4.4), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "--", color=GREY, lw=1, label="perfectly calibrated")
    width = 1.0 / max(len(c["bins"]) for c in cal.values())
    for k, (who, c) in enumerate(cal.items()):
        color = STUDENT if who == "student" else TEACHER
        bins = [b for b in c["bins"] if b["n"]]
        off = (k - (len(cal) - 1) / 2) * width / len(cal)
        ax.bar([(b["lo"] + b["hi"]) / 2 + off for b in bins], [b["accuracy"] for b in bins], width=width / len(cal),
               color=color, alpha=0.8, edgecolor="white", label=f"{who} (ECE {c['ece']:.3f})")
        axn.bar([(b["lo"] + b["hi"]) / 2 + off for b in bins], [b["n"] for b in bins], width=width / len(cal),
                color=color, alpha=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy in bin")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    axn.set_xlabel("confidence (top-label probability)")
    axn.set_ylabel("items")
    fig.tight_layout()
    return to_data_uri(fig)


def coverage_curve(cas: dict, metric: str) -> str:
    """Cascade quality and student-only quality vs the share of traffic the student answers."""
    plt = _plt()
    pts = cas["curve"]
    cov = [p["coverage"] for p in pts]
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    ax.plot(cov, [p["cascade"] for p in pts], color=CASCADE, lw=2, label="cascade (student, else teacher)")
    sel = [(p["coverage"], p["selective"]) for p in pts if p["selective"] is not None]
    ax.plot([a for a, _ in sel], [b for _, b in sel], color=STUDENT, lw=1.5, label="student on the items it answers")
    ax.axhline(cas["teacher_quality"], color=TEACHER, lw=1, ls="-", label="teacher")
    ax.axhline(cas["needed"], color=TEACHER, lw=1, ls=":", label=f"{cas['target']:.0%} of teacher")
    ax.axvline(cas["coverage"], color=GREY, lw=1, ls="--")
    ax.plot([cas["coverage"]], [cas["quality"]], "o", color="black", zorder=5)
    ax.annotate(f"t = {cas['threshold']:.2f}\ncoverage {cas['coverage']:.0%}", (cas["coverage"], cas["quality"]),
                xytext=(-80, 18 if cas["coverage"] > 0.5 else -30), textcoords="offset points", fontsize=8, arrowprops={"arrowstyle": "-", "color": GREY})
    lo = min([cas["needed"]] + [b for _, b in sel] + [p["cascade"] for p in pts])
    ax.set_ylim(max(0.0, lo - 0.05), min(1.0, max(1.0, cas["teacher_quality"])) + 0.01)
    ax.set_xlim(0, 1.0)
    ax.set_xlabel("coverage: share of items the student answers (confidence ≥ t)")
    ax.set_ylabel(metric)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=7.5, frameon=False)
    ax.grid(alpha=0.3)
    return to_data_uri(fig)


def break_even(cost: dict) -> str:
    """Cumulative cost of calling the teacher vs distilling once and serving the student.

    Drawn by :func:`protege.costs.break_even_figure` from the report's ``cost.cumulative`` curves
    (computed by :func:`protege.costs.cumulative_costs`), or from the monthly figures when absent.
    """
    from protege.costs import break_even_figure, chart_months

    _plt()
    curves = cost.get("cumulative")
    if not curves:
        months = list(range(chart_months(cost.get("break_even_months")) + 1))
        curves = {"months": months, "teacher_only": [cost["teacher_usd_per_month"] * m for m in months],
                  "distilled": [cost["one_off_usd"] + cost["student_usd_per_month"] * m for m in months],
                  "teacher_usd_per_month": cost["teacher_usd_per_month"], "one_off_usd": cost["one_off_usd"],
                  "break_even_months": cost.get("break_even_months")}
    saving = cost["teacher_usd_per_month"] - cost["student_usd_per_month"]
    then = (f"then saves {_usd(saving)}/month" if saving > 0
            else f"then costs {_usd(-saving)}/month more than the teacher: never breaks even")
    title = f"{_usd(cost['one_off_usd'])} once, {then} at {cost['volume_per_month']:,} calls/month"
    fig = break_even_figure(curves, title=title)
    return to_data_uri(fig)


def _usd(x: float) -> str:
    """Like report._money, with the $ escaped for matplotlib's mathtext."""
    if x == 0 or abs(x) >= 1:
        return f"\\${x:,.2f}"
    return f"\\${x:.{max(2, 1 - math.floor(math.log10(abs(x))))}f}"


def latency(rows: list[tuple[str, float | None, float | None, float | None]]) -> str:
    """ms per item, log scale: (name, single p50, single p95, batched) per model."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 0.5 * len(rows) + 1.2))
    ys = np.arange(len(rows))[::-1]
    h = 0.38
    for y, (name, p50, p95, batched) in zip(ys, rows):
        if _ok(p50):
            ax.barh(y + h / 2, p50, height=h, color=STUDENT if "student" in name else TEACHER,
                    xerr=[[0], [max(0.0, (p95 or p50) - p50)]], capsize=3)
            ax.text(max(p50, p95 or p50) * 1.25, y + h / 2, f"{p50:.3g} ms single (p50)", va="center", fontsize=8)
        if _ok(batched):
            ax.barh(y - h / 2, batched, height=h, color=GREY)
            ax.text(batched * 1.15, y - h / 2, f"{batched:.3g} ms batched", va="center", fontsize=8)
    ax.set_xscale("log")
    vals = [v for r in rows for v in r[1:] if _ok(v)]
    if vals:
        ax.set_xlim(min(vals) / 3, max(vals) * 30)
    ax.set_yticks(ys, [r[0] for r in rows])
    ax.set_xlabel("ms per item (log scale; whisker = p95)")
    return to_data_uri(fig)


def learning_curve(curve: dict, buy: list[dict] | None = None) -> str:
    """Agreement with the teacher vs labels (log x): the CV points with 95% CI bars, the fitted power law
    (solid over the measured range, dashed where extrapolated) and the labels-to-buy points on it."""
    plt = _plt()
    n = np.asarray(curve.get("n") or [], dtype=float)
    ag = np.asarray(curve.get("agreement") or [], dtype=float)
    ci = curve.get("agreement_ci") or []
    fig, ax = plt.subplots(figsize=(6.2, 3.6))
    if len(ci) == len(n) and all(c and _ok(c[0]) and _ok(c[1]) for c in ci):
        yerr = [[max(0.0, a - c[0]) for a, c in zip(ag, ci)], [max(0.0, c[1] - a) for a, c in zip(ag, ci)]]
    else:
        yerr = None
    ax.errorbar(n, ag, yerr=yerr, fmt="o", color=STUDENT, capsize=3, zorder=4,
                label=f"{curve.get('rung', 'student')}: agreement on held-out folds (95% CI)")
    fit, buy = curve.get("fit") or {}, buy or []
    top = max([float(x) for x in n] + [float(curve.get("n_now") or 0)] + [float(b["n_total"]) for b in buy])
    if {"a", "b", "c"} <= set(fit) and len(n):
        a, b, c = float(fit["a"]), float(fit["b"]), float(fit["c"])
        xs = np.geomspace(n.min(), n.max(), 60)
        ax.plot(xs, np.minimum(1.0, a - b * xs ** (-c)), color=GREY, lw=1.5, label=f"fit {fit.get('form', 'a - b·n^-c')}")
        if top > n.max():
            xe = np.geomspace(n.max(), top, 40)
            ax.plot(xe, np.minimum(1.0, a - b * xe ** (-c)), color=GREY, lw=1.5, ls="--", label="extrapolated")
    if curve.get("n_now") and _ok(curve.get("expected_now")):
        ax.plot([curve["n_now"]], [curve["expected_now"]], "s", color="black", ms=5, zorder=5,
                label=f"the student's {int(curve['n_now']):,} labels (fit)")
    for i, r in enumerate(buy):  # one text row higher per point: close points never share a row
        ax.plot([r["n_total"]], [r["expected_agreement"]], "D", color=CASCADE, ms=5, zorder=5,
                label="labels to buy (extrapolated; gains in the table)" if i == 0 else None)
        ax.annotate(f"+{r['more']:,}", (r["n_total"], r["expected_agreement"]), xytext=(0, 8 + 11 * i),
                    textcoords="offset points", ha="center", fontsize=7.5, color=CASCADE,
                    arrowprops={"arrowstyle": "-", "color": CASCADE, "lw": 0.5, "alpha": 0.6} if i else None)
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter, NullLocator

    ticks = []
    for t in sorted({int(x) for x in n} | {int(r["n_total"]) for r in buy}):
        if not ticks or t / ticks[-1] >= 1.35:  # closer ticks would print over each other on the log axis
            ticks.append(t)
    ax.set_ylim(top=min(1.02, ax.get_ylim()[1] + 0.012 * (len(buy) + 1)))
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks], rotation=40, ha="right")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(min(ticks) / 1.3, top * 1.6)
    ax.set_xlabel("teacher-labelled inputs (log scale)")
    ax.set_ylabel("agreement with the teacher")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2, fontsize=7.5, frameon=False)
    return to_data_uri(fig)

"""report.html: one self-contained page (plots embedded as PNG data URIs) from report.json."""

from __future__ import annotations

import base64
import html
import io

import numpy as np


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def score_plot(r: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.6))
    names = ["teacher", "student"]
    scores = [r[n]["score"] for n in names]
    lo = [r[n]["score"] - r[n]["score_ci"][0] for n in names]
    hi = [r[n]["score_ci"][1] - r[n]["score"] for n in names]
    ax.barh(names, scores, xerr=[lo, hi], color=["#8c6bb1", "#41ab5d"], capsize=6)
    for i, s in enumerate(scores):
        ax.text(0.01, i, f"{s:.3f}", va="center", color="white", fontweight="bold")
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"{r['metric']} on {r['n_eval']} gold items (95% bootstrap CI)")
    return _png(fig)


def confusion_plot(m: list[list[int]], labels: list[str], title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = np.array(m)
    cols = labels + ["(invalid)"] if a[:, -1].any() else labels
    a = a if a[:, -1].any() else a[:, :-1]
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    ax.imshow(a, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            ax.text(j, i, str(a[i, j]), ha="center", va="center", color="white" if a[i, j] > a.max() / 2 else "black")
    return _png(fig)


def _fmt(x, spec=".3f") -> str:
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def render_html(r: dict) -> str:
    t, s = r["teacher"], r["student"]
    verdict = (f"The student keeps {r['retained']:.1%} of the teacher's {r['metric']} "
               f"({s['score']:.3f} vs {t['score']:.3f} on {r['n_eval']} held-out gold items) "
               f"and answers {r['speedup']:.0f}x faster.")
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{html.escape(d['name'])}</td><td>{_fmt(d['score'])} "
        f"[{_fmt(d['score_ci'][0])}, {_fmt(d['score_ci'][1])}]</td><td>{_fmt(d.get('agreement'))}</td>"
        f"<td>{_fmt(d['ms_per_item'], '.3f')}</td><td>{_fmt(d.get('ms_per_item_batched'), '.3f')}</td>"
        f"<td>{_fmt(d['usd_per_1k'] * 1000, '.4f')}</td></tr>"
        for n, d in (("teacher", t), ("student", s)))
    ex = "".join(f"<tr><td>{html.escape(e['text'])}…</td><td>{html.escape(e['gold'])}</td>"
                 f"<td>{html.escape(str(e['teacher']))}</td><td>{html.escape(e['student'])}</td>"
                 f"<td>{e['student_confidence']:.2f}</td></tr>" for e in r.get("examples", []))
    c = r.get("cost", {})
    be = c.get("break_even_months")
    labels = r["labels"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>protege report: {html.escape(r['task'])}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:14px;vertical-align:top}}
th{{background:#f3f3f3}}.verdict{{font-size:1.2em;background:#eef7ee;padding:1em;border-radius:6px}}
img{{max-width:100%}}.row{{display:flex;gap:1em;flex-wrap:wrap}}</style></head><body>
<h1>protege report — {html.escape(r['task'])}</h1>
<p class="verdict">{html.escape(verdict)}</p>
<table><tr><th></th><th>model</th><th>{r['metric']} [95% CI]</th><th>agreement w/ teacher</th><th>ms/item (single)</th>
<th>ms/item (batched)</th><th>$ per 1M calls</th></tr>{rows}</table>
<p>retained = {_fmt(r['retained'])} (paired 95% CI {_fmt((r.get('retained_ci') or [None])[0])}–{_fmt((r.get('retained_ci') or [None, None])[1])}),
speedup = {_fmt(r['speedup'], '.0f')}x single-item, {_fmt(r.get('speedup_batched'), '.0f')}x batched; student params {s['params']:,};
trained on {s.get('n_train')} teacher-labelled items.</p>
<h2>Scores</h2><img alt="scores" src="{score_plot(r)}">
<h2>Confusion matrices</h2><div class="row"><img alt="teacher confusion" src="{confusion_plot(r['confusion']['teacher'], labels, 'teacher vs gold')}">
<img alt="student confusion" src="{confusion_plot(r['confusion']['student'], labels, 'student vs gold')}"></div>
<h2>Cost</h2><p>At {c.get('volume_per_month', 0):,} calls/month: teacher ${_fmt(c.get('teacher_usd_per_month'), '.2f')}/month,
student ${_fmt(c.get('student_usd_per_month'), '.2f')}/month; one-off labelling + training ${_fmt(c.get('one_off_usd'), '.4f')};
break-even after {_fmt(be, '.2f') if be is not None else 'never (no saving)'} months.</p>
<h2>Student errors (first 20)</h2><table><tr><th>input</th><th>gold</th><th>teacher</th><th>student</th><th>conf.</th></tr>{ex}</table>
<p style="color:#777">Measured on {html.escape(str(r.get('machine')))}.</p></body></html>"""

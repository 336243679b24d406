"""baseline.html: one self-contained page (the chart embedded as a PNG data URI) from baseline.json."""

from __future__ import annotations

import base64
import html
import io

from protege.costs import break_even_figure, format_months

_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.2em}td,th{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#f4f4f4}.num{text-align:right;font-variant-numeric:tabular-nums}
.verdict{padding:.8em 1.2em;border-radius:6px;background:#eef6ee;border:1px solid #9c9}.no{background:#fbeaea;border-color:#d99}
.fix{background:#fff6e0;border-color:#e0c080}.wrong{color:#b30000}.ok{color:#1a7f37}small{color:#666}"""


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _ci(d: dict) -> str:
    lo, hi = d["score_ci"]
    return f"{d['score']:.3f} <small>[{lo:.3f}, {hi:.3f}]</small>"


def render_baseline_html(r: dict, items: list[dict]) -> str:
    e = html.escape
    v = r["verdict"]
    cls = "no" if v["decision"].startswith("no") else "fix" if v["decision"].startswith("fix") else ""
    p = [f"<!doctype html><meta charset='utf-8'><title>{e(r['task'])}: baseline</title><style>{_CSS}</style>",
         f"<h1>{e(r['task'])}: the weekend experiment</h1>",
         f"<div class='verdict {cls}'><b>Verdict: {e(v['decision'])}</b><ul>"
         + "".join(f"<li>{e(t)}</li>" for t in v["reasons"]) + "</ul></div>",
         f"<h2>Quality on {r['n']} gold items</h2><table><tr><th></th><th>model</th><th>{e(r['metric'])} ± 95% CI</th>"
         "<th class=num>agreement with teacher</th><th class=num>invalid</th><th class=num>ms/item</th>"
         "<th class=num>$ / 1k calls</th></tr>"]
    t = r["teacher"]
    p.append(f"<tr><td>teacher</td><td>{e(t['name'])}</td><td>{_ci(t)}</td><td class=num>—</td>"
             f"<td class=num>{t['invalid_answers']}</td><td class=num>{t['ms_per_item']:.1f}</td>"
             f"<td class=num>{t['usd_per_1k']:.6f}</td></tr>")
    s = r["small_model"]
    if "score" in s:
        p.append(f"<tr><td>small model ({e(s['shots'])})</td><td>{e(s['name'])}</td><td>{_ci(s)}</td>"
                 f"<td class=num>{s['agreement_with_teacher']:.3f}</td><td class=num>{s['invalid_answers']}</td>"
                 f"<td class=num>{s['ms_per_item']:.1f}</td><td class=num>{s['usd_per_1k']:.6f}</td></tr>")
    st = r["student"]
    p.append(f"<tr><td>student ({e(st['kind'])})</td><td><small>{e(st['timing']['source'])}</small></td><td>—</td>"
             f"<td class=num>—</td><td class=num>—</td><td class=num>{st['ms_per_item']:.3f}</td>"
             f"<td class=num>{st['usd_per_1k']:.6f}</td></tr></table>")
    if "skipped" in s:
        p.append(f"<p><small>{e(s['skipped'])}</small></p>")
    c = r["consistency"]
    p.append("<h2>Teacher self-consistency</h2>")
    if c["measured"]:
        lo, hi = c["consistent_ci"]
        p.append(f"<p>All answers agree on <b>{c['consistent']:.0%}</b> of inputs <small>[{lo:.0%}, {hi:.0%}]</small>. "
                 "Agreement of each repeat / variant with the teacher's answer: "
                 + ", ".join(f"{e(k)} {x:.0%}" for k, x in c["agreement_with_base"].items()) + ".</p>")
    else:
        p.append("<p>Not measured (no repeated samples or prompt variants).</p>")
    if c.get("note"):
        p.append(f"<p><small>{e(c['note'])}</small></p>")
    k = r["cost"]
    p.append(f"<h2>Cost case at {k['volume_per_month']:,} calls/month</h2><table>"
             f"<tr><td>teacher per call</td><td class=num>${k['teacher_usd_per_call']:.8f}</td><td><small>{e(t['cost_basis'])}</small></td></tr>"
             f"<tr><td>student per call</td><td class=num>${k['student_usd_per_call']:.8f}</td><td><small>{st['ms_per_item']:.3f} ms x ${st['usd_per_hour']}/hour</small></td></tr>"
             f"<tr><td>label the pool</td><td class=num>${k['labelling_usd']:,.4f}</td><td><small>{k['n_inputs_to_label']:,} inputs</small></td></tr>"
             f"<tr><td>training</td><td class=num>${k['training_usd']:,.4f}</td><td><small>{e(k['training_source'])}</small></td></tr>"
             f"<tr><td>people (engineering_usd)</td><td class=num>${k['engineering_usd']:,.2f}</td><td></td></tr>"
             f"<tr><td>teacher per month</td><td class=num>${k['teacher_usd_per_month']:,.2f}</td><td></td></tr>"
             f"<tr><td>student per month</td><td class=num>${k['student_usd_per_month']:,.2f}</td><td></td></tr>"
             f"<tr><td><b>break-even</b></td><td class=num><b>{e(format_months(k['break_even_months']))}</b></td>"
             f"<td>saves ${k['monthly_saving']:,.2f}/month</td></tr></table>")
    p.append(f"<img alt='break-even chart' src='{_png(break_even_figure(k['curves']))}'>")
    mach = r.get("machine") or {}
    if mach:
        p.append(f"<p><small>Timed on {e(str(mach.get('cpu')))}, {mach.get('cores')} cores, load "
                 f"{mach.get('load_avg_1m') or 0:.1f}, {e(str(mach.get('date')))}. {e(mach.get('warning', ''))}</small></p>")
    err = t["errors"]
    if err["errors"]:
        by = err.get("by", "label")
        p.append(f"<h2>Teacher errors by gold {by} (worst first)</h2><table><tr><th>{by}</th><th class=num>n</th>"
                 "<th class=num>recall</th><th>most often answered instead</th></tr>")
        for d in err["per_label"]:
            rec = "—" if d["recall"] is None else f"{d['recall']:.0%}"
            p.append(f"<tr><td>{e(d['label'])}</td><td class=num>{d['n']}</td><td class=num>{rec}</td>"
                     f"<td>{e(d['most_confused_with'] or '—')}</td></tr>")
        p.append("</table>")
    vnames = list(items[0]["variants"]) if items else []
    p.append(f"<h2>Side by side ({min(len(items), 40)} of {len(items)} items)</h2><table><tr><th>input</th><th>gold</th>"
             "<th>teacher</th>" + ("<th>small model</th>" if items and "small" in items[0] else "")
             + "".join(f"<th>{e(n)}</th>" for n in vnames) + "</tr>")

    def cell(lab, gold, ok=None):  # ok: the kind's own comparison (extract: same fields, key order aside)
        right = lab == gold if ok is None else ok
        return f"<td class={'ok' if right else 'wrong'}>{e(str(lab))}</td>"

    for it in items[:40]:
        text, ok = it["text"], it.get("ok", {})
        p.append(f"<tr><td>{e(text[:220])}{'…' if len(text) > 220 else ''}</td><td>{e(it['gold'])}</td>"
                 + cell(it["teacher"], it["gold"], ok.get("teacher"))
                 + (cell(it.get("small"), it["gold"], ok.get("small")) if "small" in it else "")
                 + "".join(cell(it["variants"][n], it["gold"], ok.get(n)) for n in vnames) + "</tr>")
    p.append("</table>")
    return "\n".join(p)

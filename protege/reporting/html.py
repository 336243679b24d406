"""report.html and compare.html: one self-contained page each, rendered from report.json data.

Read top to bottom, the page answers the questions in the order a reviewer asks them: should we ship
it (verdict), how sure are we (CIs, paired test), where does it fail (confusion, worst errors), can
a cascade catch that (calibration, coverage curve), and what does it save (latency, $, break-even).
Plots are PNG data URIs (:mod:`protege.reporting.plots`), so the file has no external references.
"""

from __future__ import annotations

from protege.reporting.fmt import speed_words
from protege.costs import format_months
from protege.kinds import KINDS
from protege.reporting import plots
from protege.reporting.fmt import _ci, _e, _f, _money
from protege.reporting.ladder_html import labels_section, ladder_section, per_label_flags

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1080px;margin:1.5em auto;padding:0 1em;color:#222;line-height:1.4}
h1{margin-bottom:.1em}h2{margin-top:1.6em;border-bottom:1px solid #e3e3e3;padding-bottom:.2em}
.sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #ddd;padding:4px 8px;font-size:13px;vertical-align:top}
th{background:#f5f5f5;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.verdict{font-size:1.15em;padding:.9em 1.1em;border-radius:8px;border-left:6px solid}
.ship{background:#eaf6ee;border-color:#2e9e5b}.cascade{background:#fdf3e4;border-color:#e08a1e}.notyet{background:#fbeaea;border-color:#c0392b}
.kpis{display:flex;gap:.7em;flex-wrap:wrap;margin:1em 0}.kpi{flex:1 1 0;min-width:140px;background:#fafafa;border:1px solid #e6e6e6;border-radius:8px;padding:.6em .8em}
.kpi b{display:block;font-size:1.45em}.kpi span{color:#666;font-size:.85em}
.row{display:flex;gap:1.5em;flex-wrap:wrap;align-items:flex-start}.row>div{flex:1;min-width:300px}
img{max-width:100%}.note{color:#666;font-size:.9em}.bad{color:#c0392b}.ok{color:#2e7d32}
tr.flag td,tr.flag th{background:#fbeaea}tr.chosen td,tr.chosen th{background:#eaf6ee;font-weight:600}
td.text{max-width:460px;font-size:12px;color:#333;overflow-wrap:anywhere}
"""


def _kpis(r: dict) -> str:
    c, cas, p = r.get("cost", {}), r.get("cascade") or {}, r.get("paired") or {}
    be = c.get("break_even_months")
    tiles = [
        (f"{_f(r['retained'], '.1%')}", f"of teacher's {r['metric']} retained<br>95% CI {_ci(r.get('retained_ci'), '.1%')}"),
        (_e(speed_words(r["speedup"]) or "—"), f"per item (p50)<br>{_e(speed_words(r.get('speedup_batched')) or '—')} batched"),
        (f"{_f(p.get('p_value'), '.2g')}", f"p-value, {p.get('test', 'paired test')}<br>student vs teacher, same items"),
        _third_tile(r, cas),
        _price_tile(c),
        (format_months(be), f"to break even at {c.get('volume_per_month', 0):,} calls/month"),
    ]
    return '<div class="kpis">' + "".join(f'<div class="kpi"><b>{v}</b><span>{t}</span></div>' for v, t in tiles) + "</div>"


def _third_tile(r: dict, cas: dict) -> tuple[str, str]:
    """classify: cascade coverage; extract: the student's valid-JSON rate; generate: judge win rate or chrF."""
    kind = KINDS.get(r.get("kind", "classify"), KINDS["classify"])
    if kind.json:
        s = (r.get("metrics") or {}).get("student") or {}
        return f"{_f(s.get('json_validity'), '.0%')}", (f"of the student's answers are valid JSON for the schema<br>"
                                                       f"95% CI {_ci(s.get('json_validity_ci'), '.0%')}")
    if kind.judged:
        j = r.get("judge")
        if j:
            return f"{_f(j.get('student_win_rate'), '.0%')}", (f"student win rate vs teacher, judged by "
                                                               f"{_e(_short(j.get('judge', '')))} in both orders<br>"
                                                               f"95% CI {_ci(j.get('win_rate_ci'), '.0%')}")
        s = (r.get("metrics") or {}).get("student") or {}
        return f"{_f(s.get('chrf'), '.3f')}", f"student chrF vs gold<br>95% CI {_ci(s.get('chrf_ci'))}"
    return (f"{_f(cas.get('coverage'), '.0%')}", f"traffic the student answers alone at {_f(cas.get('target'), '.0%')} "
            f"of teacher quality (t = {_f(cas.get('threshold'), '.2f')})")


def _price_tile(c: dict) -> tuple[str, str]:
    """Teacher → student price, per 1k calls, or per 1M when per-1k figures would be fractions of a cent."""
    t, s = c.get("teacher_usd_per_1k"), c.get("student_usd_per_1k")
    if t is None or s is None:
        return "—", "per 1k calls"
    k, unit = (1000, "1M") if t < 0.1 else (1, "1k")
    return f"{_money(t * k)} → {_money(s * k)}", f"per {unit} calls, teacher → student"


def _machine(m) -> str:
    if not isinstance(m, dict):
        return _e(m)
    return _e(f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, Python {m.get('python', '?')}, {m.get('date', '')}")


def _main_table(r: dict) -> str:
    head = ("<tr><th></th><th>model</th><th>{m} [95% CI]</th><th>agreement w/ teacher</th><th>ms/item p50</th>"
            "<th>ms/item p95</th><th>items/s batched</th><th>$ / 1k calls</th><th>$ / month</th><th>params</th></tr>").format(m=_e(r["metric"]))
    rows = []
    for who in ("teacher", "student"):
        d = r[who]
        rows.append(f"<tr><th>{who}</th><td>{_e(d['name'])}</td><td class=num>{_f(d['score'])} {_ci(d['score_ci'])}</td>"
                    f"<td class=num>{_f(d.get('agreement'))}</td><td class=num>{_f(d['ms_per_item'], '.3g')}</td>"
                    f"<td class=num>{_f(d.get('ms_per_item_p95'), '.3g')}</td><td class=num>{_f(d.get('items_per_s_batched'), ',.0f')}</td>"
                    f"<td class=num>{_money(d['usd_per_1k'])}</td><td class=num>{_money(d.get('usd_per_month'))}</td>"
                    f"<td class=num>{_f(d.get('params'), ',')}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>" + _runtime_line(r["student"].get("runtime"))


def _runtime_line(rt: dict | None) -> str:
    """A causal-LM student's decode runtime, checked against transformers (see protege.stages.evaluate.runtime)."""
    if not rt:
        return ""
    s = f"Student decodes with {_e(rt['name'])}"
    if rt.get("constrained_fields"):
        s += f", schema-constrained ({len(rt['constrained_fields'])} fields forced, only values decoded)"
    if rt.get("decoded_tokens_per_answer") is not None:
        s += f"; {rt['decoded_tokens_per_answer']:.1f} tokens decoded per answer"
        if rt.get("answer_tokens_per_answer"):
            s += f" of {rt['answer_tokens_per_answer']:.1f}"
    if rt.get("same_answer_as_reference") is not None:
        s += (f". Same answer as transformers on {rt['same_answer_as_reference']:.0%} of {rt['n_reference']} gold items "
              f"{_ci(rt['same_answer_ci'], '.0%')}")
    ref = (rt.get("reference_latency") or {}).get("p50_ms")
    if ref:
        s += f"; transformers takes {ref:,.0f} ms per item here"
        if rt.get("latency_vs_reference"):
            s += f" (this runtime: {rt['latency_vs_reference']:.0%} of that)"
    return f"<p><small>{s}.</small></p>"


def _score_series(r: dict) -> list:
    m = r.get("metrics") or {}
    series = []
    for who in ("teacher", "student"):
        series.append((who, f"{who} {r['metric']}", r[who]["score"], r[who]["score_ci"]))
    extra = {"classify": [("macro_f1", "macro-F1")], "extract": [("exact_match", "exact match"), ("json_validity", "valid JSON")],
             "generate": [("chrf", "chrF")]}.get(r["kind"], [])
    for key, name in extra:
        for who in ("teacher", "student"):
            if key in m.get(who, {}):
                series.append((who, f"{who} {name}", m[who][key], m[who].get(f"{key}_ci")))
    if r["student"].get("agreement") is not None:
        series.append(("student", "student–teacher agreement", r["student"]["agreement"], r["student"].get("agreement_ci")))
    return [x for x in series if x[2] is not None]


def _active_section(a: dict) -> str:
    """generate.strategy: active — agreement with the teacher against teacher calls, one row per round."""
    rows = "".join(f"<tr><td class=num>{c['round']}</td><td class=num>{c['calls']}</td><td class=num>{c['n_labelled']}</td>"
                   f"<td class=num>{_f(c['agreement'], '.1%')}</td></tr>" for c in a["curve"])
    return (f"<h2>Active labelling</h2><p class=note>Static student refitted each round; agreement measured on the "
            f"{_e(a.get('curve_on', 'gold inputs'))}. Stopped: {_e(a.get('stopped'))}.</p><table><tr><th>round</th>"
            f"<th>teacher calls</th><th>inputs labelled</th><th>agreement</th></tr>{rows}</table>")


def _risk_note(g: dict | None) -> str:
    """The gateway's risk gate: its promise (certified out of fold) and what it delivered on gold."""
    if not g:
        return ""
    gold = g["gold"]
    if not g["feasible"]:
        return (f"<p class=note><b>Risk gate</b>: disagreement ≤ {_f(g['risk'], '.1%')} with probability ≥ "
                f"{_f(1 - g['delta'], '.0%')} cannot be certified on {g['n_cal']} out-of-fold rows: the gateway escalates "
                "every request. Raise serve.risk or label more rows.</p>")
    return (f"<p class=note><b>Risk gate</b> (the gateway's threshold, serve.risk / serve.delta): confidence ≥ "
            f"<b>{_f(g['threshold'], '.3f')}</b> promises disagreement with the teacher ≤ {_f(g['risk'], '.1%')} on answered "
            f"items with probability ≥ {_f(1 - g['delta'], '.0%')} (certified on {g['n_cal']} out-of-fold rows, "
            f"{_f(g['coverage'], '.0%')} answered there). On gold: {_f(gold['coverage'], '.0%')} answered, disagreement "
            f"{_f(gold['risk'], '.1%')} (95% CI {_ci(gold.get('risk_ci'), '.1%')}), cascade accuracy {_f(gold['cascade_accuracy'])} vs "
            f"the teacher's {_f(gold['teacher_accuracy'])}.</p>")


def _per_label(r: dict) -> str:
    """Precision / recall / F1 per label for both models; labels where the student's recall falls far below
    the teacher's are flagged (a student that learned the label prior loses the rare labels first)."""
    m = r.get("metrics") or {}
    t, s = (m.get("teacher") or {}).get("per_label"), (m.get("student") or {}).get("per_label")
    if not t or not s:
        return ""
    rec = (r.get("per_label_recall") or {}).get("labels") or {}
    cv = any(x.get("student_cv_vs_teacher") is not None for x in rec.values())
    rows = []
    for lab in r["labels"]:
        x = rec.get(lab) or {}
        cells = "".join(f"<td class=num>{_f(d[lab][k], '.2f')}</td>" for d in (t, s) for k in ("precision", "recall", "f1"))
        extra = f"<td class=num>{s[lab].get('predicted', '—')}</td>"
        if cv:
            extra += f"<td class=num>{_f(x.get('student_cv_vs_teacher'), '.2f')}</td>"
        flag = (f"<td class=bad>recall {_f(x.get('gap'), '.0%')} below the teacher</td>" if x.get("flag") else "<td></td>")
        rows.append(f"<tr{' class=flag' if x.get('flag') else ''}><th>{_e(lab)}</th><td class=num>{t[lab]['support']}</td>"
                    f"{cells}{extra}{flag}</tr>")
    cv_head = "<th rowspan=2>student recall<br>CV vs teacher</th>" if cv else ""
    return (per_label_flags(r) + "<table><tr><th rowspan=2>label</th><th rowspan=2>gold items</th><th colspan=3>teacher</th>"
            f"<th colspan=3>student</th><th rowspan=2>student<br>predicted</th>{cv_head}<th rowspan=2></th></tr>"
            "<tr>" + "<th>precision</th><th>recall</th><th>F1</th>" * 2 + f"</tr>{''.join(rows)}</table>")


def _errors(r: dict) -> str:
    ex = r.get("examples") or []
    if not ex:
        return "<p>The student made no errors on the gold items.</p>"
    err = r.get("errors") or {}
    lead = (f"<p>The student gets {err.get('student', len(ex))} of {r['n_eval']} gold items wrong; "
            f"{err.get('copied_from_teacher', '?')} of those copy the teacher's wrong answer (fix them in the teacher labels), "
            f"the rest are the student's own. Most confident errors first — a cascade cannot catch these.</p>")
    def conf(x) -> str:
        return "" if x is None else f" ({x:.2f})"

    rows = "".join(
        f"<tr><td class=text>{_e(e['text'])}…</td><td>{_e(e['gold'])}</td>"
        f"<td class={'ok' if e['teacher'] == e['gold'] else 'bad'}>{_e(e['teacher'])}{conf(e.get('teacher_confidence'))}</td>"
        f"<td class=bad>{_e(e['student'])}{conf(e.get('student_confidence'))}</td>"
        f"<td>{'copied teacher' if e.get('copied_teacher') else 'own error'}</td></tr>" for e in ex)
    return lead + f"<table><tr><th>input</th><th>gold</th><th>teacher (conf.)</th><th>student (conf.)</th><th></th></tr>{rows}</table>"


def _text_errors(r: dict) -> str:
    """extract / generate: the student's lowest-scoring items, gold vs teacher vs student output with scores."""
    ex = r.get("examples") or []
    if not ex:
        return f"<p>The student scores a full {_e(r['metric'])} on every gold item.</p>"
    err = r.get("errors") or {}
    lead = (f"<p>The student scores below a full {_e(r['metric'])} on {err.get('student', len(ex))} of {r['n_eval']} gold "
            f"items; {err.get('copied_from_teacher', '?')} of those repeat the teacher's answer word for word. Lowest "
            f"scores first (score against gold in brackets).</p>")

    def cell(text, score, cls) -> str:
        return f"<td class='text {cls}'>{_e(text if text is not None else '(no answer)')} <b>[{_f(score, '.2f')}]</b></td>"

    rows = "".join(
        f"<tr><td class=text>{_e(e['text'])}</td><td class=text>{_e(e['gold'])}</td>"
        + cell(e["teacher"], e.get("teacher_score"), "ok" if (e.get("teacher_score") or 0) >= 1 else "")
        + cell(e["student"], e.get("student_score"), "bad")
        + f"<td>{'copied teacher' if e.get('copied_teacher') else 'own error'}</td></tr>" for e in ex)
    return lead + (f"<table><tr><th>input</th><th>gold</th><th>teacher output [score]</th><th>student output [score]</th>"
                   f"<th></th></tr>{rows}</table>")


def _judge(r: dict) -> str:
    j = r.get("judge")
    if not j:
        return ""
    return (f"<h2>LLM-as-judge</h2><p>{_e(j.get('judge'))} compared student and teacher answers on {j['n']} gold items, "
            f"each pair in both orders (a verdict that flips with the order counts as a tie). Student win rate "
            f"<b>{_f(j.get('student_win_rate'))}</b> {_ci(j.get('win_rate_ci'))} (wins + ties/2; 0.5 = on par): "
            f"{j['wins']} wins, {j['ties']} ties, {j['losses']} losses, {j.get('invalid', 0)} without a valid verdict. "
            f"Position consistency {_f(j.get('position_consistency'), '.0%')}, first position chosen "
            f"{_f(j.get('first_position_rate'), '.0%')} of the time. {j.get('calls', 0)} judge calls "
            f"({j.get('cache_hits', 0)} from the ledger), {_money(j.get('usd'))}.</p>")


def _notes(r: dict) -> str:
    n = r.get("notes") or {}
    if not n:
        return ""
    return "<p class=note>" + " ".join(f"<b>{_e(k)}</b>: {_e(v)}." for k, v in n.items()) + "</p>"


def _fidelity(r: dict) -> str:
    f = r.get("fidelity") or {}
    parts = [f"agreement with the teacher {_f(f.get('agreement'))} {_ci(f.get('agreement_ci'))}"
             + (f" ({_e(f['agreement_rule'])})" if f.get("agreement_rule") else "")]
    metric = r.get("metric")
    if f.get(f"{metric}_vs_teacher") is not None:
        parts.append(f"{_e(metric)} of the student's answers against the teacher's {_f(f[f'{metric}_vs_teacher'])} "
                     f"{_ci(f.get(f'{metric}_vs_teacher_ci'))}")
    if "kl_teacher_student" in f:
        parts.append(f"KL(teacher ‖ student) {_f(f['kl_teacher_student'])} {_ci(f.get('kl_ci'))} nats, "
                     f"JSD {_f(f['jsd'])} {_ci(f.get('jsd_ci'))} nats (max ln 2 = 0.693), over {f.get('n')} items with teacher distributions")
    return "<p>Fidelity: " + "; ".join(parts) + ".</p>"


def _paired(r: dict) -> str:
    p = r.get("paired") or {}
    if not p:
        return ""
    extra = ""
    if "only_first_right" in p:
        extra = (f" Items only the student got right: {p['only_first_right']}; only the teacher: {p['only_second_right']}"
                 f" (paired bootstrap p = {_f(p.get('bootstrap_p_value'), '.2g')}).")
    word = "a significant" if p["p_value"] < 0.05 else "no significant"
    return (f"<p>Paired comparison on the same {r['n_eval']} items ({_e(p['test'])}): student − teacher = "
            f"{_f(p['diff'], '+.3f')} {_ci(p.get('diff_ci'), '+.3f')}, p = {_f(p['p_value'], '.2g')} — {word} difference at 5%.{extra}</p>")


def render_html(r: dict) -> str:
    v = r.get("verdict") or {"decision": "ship", "text": ""}
    cls = {"ship": "ship", "cascade": "cascade"}.get(v["decision"], "notyet")
    labels = r.get("labels") or []
    sections = [f"<h1>protege report — {_e(r['task'])}</h1>",
                f"<p class=sub>{_e(r['kind'])} · {r['n_eval']} held-out gold items · teacher {_e(r['teacher']['name'])} → "
                f"student {_e(r['student']['name'])} · {_e((r.get('machine') or {}).get('date', ''))}</p>",
                f'<p class="verdict {cls}"><b>{_e(v["decision"].upper())}.</b> {_e(v["text"])}</p>', _kpis(r), _notes(r),
                _main_table(r),
                "<h2>Scores</h2>", f'<img alt="scores" src="{plots.score_bars(_score_series(r), "score on gold items (95% bootstrap CI)")}">',
                _paired(r), _fidelity(r), _judge(r), ladder_section(r), labels_section(r)]
    if r.get("confusion") and labels:
        sections += ["<h2>Where the errors are</h2>", f'<img alt="confusion matrices" src="{plots.confusion_pair(r["confusion"], labels)}">',
                     _per_label(r)]
    cal, cas = r.get("calibration") or {}, r.get("cascade")
    if cal or cas:
        sections.append("<h2>Calibration and the cascade</h2><div class=row>")
        if cal:
            ece = "; ".join(f"{k} ECE {_f(c['ece'])}" for k, c in cal.items())
            sections.append(f'<div><img alt="reliability diagram" src="{plots.reliability(cal)}"><p class=note>Reliability: {ece}. '
                            "Bars under the diagonal are over-confident bins.</p></div>")
        if cas:
            sections.append(f'<div><img alt="coverage curve" src="{plots.coverage_curve(cas, r["metric"])}">'
                            f"<p class=note>Answer with the student when its confidence ≥ <b>{_f(cas['threshold'], '.3f')}</b>: it answers "
                            f"{_f(cas['coverage'], '.1%')} of items and the system scores {_f(cas['quality'])} {_ci(cas.get('quality_ci'))} "
                            f"vs the teacher's {_f(cas['teacher_quality'])} (target {_f(cas['target'], '.0%')}). "
                            f"Chosen on {_e(cas.get('selected_on', 'the gold items'))}; written to report.json → cascade.</p>"
                            f"{_risk_note(cas.get('risk_gate'))}</div>")
        sections.append("</div>")
    if r.get("active"):
        sections.append(_active_section(r["active"]))
    c = r.get("cost") or {}
    lat = [("teacher", r["teacher"]["ms_per_item"], r["teacher"].get("ms_per_item_p95"), r["teacher"].get("ms_per_item_batched")),
           ("student", r["student"]["ms_per_item"], r["student"].get("ms_per_item_p95"), r["student"].get("ms_per_item_batched"))]
    sections += ["<h2>Speed and cost</h2><div class=row>", f'<div><img alt="latency" src="{plots.latency(lat)}"></div>']
    if c.get("teacher_usd_per_month") is not None:
        be = c.get("break_even_months")
        sections += [f'<div><img alt="break-even chart" src="{plots.break_even(c)}"></div></div>',
                     f"<p>At {c['volume_per_month']:,} calls/month: teacher {_money(c['teacher_usd_per_month'])}/month, student "
                     f"{_money(c['student_usd_per_month'])}/month; one-off labelling {_money(c.get('labelling_usd'))} + training "
                     f"{_money(c.get('training_usd'))}; break-even after {'never (no saving)' if be is None else format_months(be)}. "
                     f"<span class=note>Basis: {_e(c.get('basis', ''))}.</span></p>"]
    else:
        sections.append("</div>")
    sections += ["<h2>Worst student errors</h2>", _errors(r) if KINDS.get(r.get("kind"), KINDS["classify"]).labelled else _text_errors(r)]
    d = r.get("data") or {}
    if d:
        cur = d.get("curated") or {}
        sections.append(f"<h2>Data</h2><p>{d.get('teacher_labelled')} inputs labelled by the teacher; curate kept "
                        f"{cur.get('n_kept')} (dropped: {_e(cur.get('dropped') or 'none')}); the student trained on "
                        f"{r['student'].get('n_train')} and early-stopped on a dev split of teacher labels. Gold items are never trained on.</p>")
    sections.append(f"<p class=note>Measured in one run on {_machine(r.get('machine'))}.</p>")
    return _page(f"protege report: {r['task']}", "\n".join(sections))


def _page(title: str, body: str, extra_css: str = "") -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{CSS}{extra_css}</style></head><body>\n{body}\n</body></html>")


def _short(name: str) -> str:
    return str(name).rsplit("/", 1)[-1].removesuffix(".gguf")


def render_compare_html(c: dict) -> str:
    """Several runs side by side: one table, score bars with CIs, and paired tests against the first run."""
    runs = c["runs"]
    tasks = sorted({x["task"] for x in runs})
    metrics = sorted({x["metric"] for x in runs})
    head = ("<tr><th>run</th><th>student</th><th>teacher</th><th>score [95% CI]</th><th>teacher score</th>"
            "<th>retained [CI]</th><th>agreement</th><th>vs first run</th><th>ECE</th><th>cascade coverage</th>"
            "<th>ms/item p50</th><th>items/s batched</th><th>$ / 1M calls</th><th>break-even</th></tr>")
    rows = []
    for x in runs:
        vs = x.get("vs_first")
        vs_txt = "baseline" if x is runs[0] else ("—" if not vs else f"{vs['diff']:+.3f}<br>p = {vs['p_value']:.2g}, n = {vs['n']}")
        task = "" if len(tasks) == 1 else f"<br><span class=note>{_e(x['task'])}</span>"
        rows.append(f"<tr><td>{_e(x['run'])}{task}</td><td>{_e(x['student'])}</td><td>{_e(_short(x['teacher']))}</td>"
                    f"<td class=num>{_f(x['score'])}<br>{_ci(x['score_ci'])}</td><td class=num>{_f(x['teacher_score'])}</td>"
                    f"<td class=num>{_f(x['retained'], '.1%')}<br>{_ci(x.get('retained_ci'), '.1%')}</td>"
                    f"<td class=num>{_f(x.get('agreement'))}</td><td class=num>{vs_txt}</td><td class=num>{_f(x.get('ece'))}</td>"
                    f"<td class=num>{_f(x.get('cascade_coverage'), '.0%')}</td><td class=num>{_f(x['ms_per_item'], '.3g')}</td>"
                    f"<td class=num>{_f(x.get('items_per_s_batched'), ',.0f')}</td>"
                    f"<td class=num>{_money(None if x.get('usd_per_1k') is None else x['usd_per_1k'] * 1000)}</td>"
                    f"<td class=num>{format_months(x.get('break_even_months'))}</td></tr>")
    colors = [plots.STUDENT, plots.CASCADE, "#3b7dd8", "#c0392b", "#8e8e8e", "#16a085"]
    series = [("student", x["run"], x["score"], x["score_ci"]) for x in runs]
    img = plots.score_bars(series, f"student {' / '.join(metrics)} on gold items (95% bootstrap CI)",
                           colors=[colors[i % len(colors)] for i in range(len(runs))])
    body = (f"<h1>protege compare — {len(runs)} runs</h1><p class=sub>{_e(', '.join(tasks))} · {_e(' / '.join(metrics))} · "
            f"{_e(c.get('date', ''))}</p><div style=\"overflow-x:auto\"><table>{head}{''.join(rows)}</table></div>"
            f"<p class=note>“vs first run”: difference in score against the first run's student on the gold items both "
            f"scored, with a paired test (exact McNemar for right/wrong scores, paired bootstrap otherwise).</p>"
            f'<h2>Scores</h2><img alt="compare scores" src="{img}">')
    return _page("protege compare", body, extra_css="body{max-width:1400px}td,th{font-size:12px}")

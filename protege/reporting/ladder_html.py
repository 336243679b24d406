"""report.html's student-ladder sections: the rungs side by side, the learning curve and what more labels
would buy, and the per-label recall flags. Each returns "" when report.json has nothing for it (a student
that was not chosen by the ladder), so the page is unchanged for those runs."""

from __future__ import annotations

from protege.reporting import plots
from protege.reporting.fmt import _bytes, _ci, _e, _f, _money


def ladder_section(r: dict) -> str:
    """Every rung: CV agreement with the teacher (what chose), gold score ± CI and p vs the chosen student
    (reported after the choice), ms/item in this run, size, training time; the chosen row highlighted."""
    lad = r.get("ladder")
    if not lad or not lad.get("rungs"):
        return ""
    metric = _e(r.get("metric", "score"))
    head = ("<tr><th>rung</th><th>CV agreement w/ teacher [95% CI]</th>"
            f"<th>gold {metric} [95% CI]</th><th>p vs chosen<br>(McNemar)</th><th>agreement w/ teacher<br>on gold</th>"
            "<th>ms/item p50<br>this run</th><th>ms/item p50<br>at training</th><th>size</th><th>train s</th><th></th></tr>")
    rows = []
    for g in lad["rungs"]:
        status = ("chosen" if g.get("chosen") else
                  ("" if g.get("eligible") in (True, None) else f"over {_f(lad.get('max_ms'), 'g')} ms: not eligible"))
        if g.get("note"):
            status = (status + "; " if status else "") + g["note"]
        p = "—" if g.get("chosen") else _f(g.get("p_vs_chosen"), ".2g")
        rows.append(f"<tr{' class=chosen' if g.get('chosen') else ''}><th>{_e(g.get('name'))}</th>"
                    f"<td class=num>{_f(g.get('cv_agreement'))} {_ci(g.get('cv_ci'))}</td>"
                    f"<td class=num>{_f(g.get('score'))} {_ci(g.get('score_ci'))}</td><td class=num>{p}</td>"
                    f"<td class=num>{_f(g.get('agreement'))}</td><td class=num>{_f(g.get('ms_p50'), '.3g')}</td>"
                    f"<td class=num>{_f(g.get('ms_p50_train'), '.3g')}</td><td class=num>{_bytes(g.get('size_bytes'))}</td>"
                    f"<td class=num>{_f(g.get('train_s'), ',.1f')}</td><td>{_e(status)}</td></tr>")
    why = f"<p><b>Why {_e(lad.get('chosen'))}:</b> {_e(lad.get('why') or '')}</p>" if lad.get("why") else ""
    if lad.get("seconds") is not None:
        budget = lad.get("time_budget_s")
        why += (f"<p>The ladder took {_f(lad['seconds'], ',.0f')} s"
                + (f" of its {_f(budget, ',.0f')} s budget (student.time_budget_s)" if budget else "")
                + (f"; learning curve skipped: {_e(lad['curve_skipped'])}" if lad.get("curve_skipped") else "") + ".</p>")
    return (f"<h2>Student ladder</h2>{why}<table>{head}{''.join(rows)}</table>"
            f"<p class=note>The rung was chosen by agreement with the teacher on {_e(lad.get('folds') or 'the')} "
            f"held-out folds of teacher-labelled inputs, among rungs under {_f(lad.get('max_ms'), 'g')} ms per item — "
            "never on gold. The gold columns are measured afterwards on the same gold items as the report's student, "
            "so they show what the choice cost or gained; p compares each rung with the chosen student on those "
            "items (exact McNemar). ms/item is single-item p50 timed in this run on this machine.</p>")


def labels_section(r: dict) -> str:
    """The learning curve and the labels-to-buy table, with the honest reading of both."""
    curve = r.get("learning_curve")
    if not curve or not curve.get("n"):
        return ""
    buy = r.get("labels_to_buy") or []
    img = f'<img alt="learning curve" src="{plots.learning_curve(curve, buy)}">'
    pts = ", ".join(f"{int(n):,}: {_f(a)}" for n, a in zip(curve["n"], curve.get("agreement") or []))
    fit = curve.get("fit") or {}
    fit_txt = (f"fit {_e(fit.get('form', 'a - b * n**(-c)'))} with a = {_f(fit.get('a'))}, b = {_f(fit.get('b'), '.3g')}, "
               f"c = {_f(fit.get('c'), '.3g')}") if fit else "no fit"
    table = ""
    if buy:
        rows = "".join(f"<tr><td class=num>+{b['more']:,}</td><td class=num>{b['n_total']:,}</td>"
                       f"<td class=num>{_f(b['expected_agreement'])}</td><td class=num>{b['gain'] * 100:+.1f}</td>"
                       f"<td class=num>{_money(b.get('usd'))}</td><td class=num>{_f(b.get('extrapolation'), '.1f')}x</td></tr>"
                       for b in buy)
        table = ("<table><tr><th>label more</th><th>labels in all</th><th>expected agreement</th><th>gain (points)</th>"
                 f"<th>teacher $</th><th>beyond the<br>largest point</th></tr>{rows}</table>")
    price = (f" Teacher $ per labelled input: {_money(curve.get('usd_per_label'))} ({_e(curve.get('usd_basis', ''))})."
             if curve.get("usd_per_label") is not None else "")
    if curve.get("fit_note"):
        price += f" <b>Caveat:</b> {_e(curve['fit_note'])}."
    return (f"<h2>How many labels to buy</h2><div class=row><div>{img}</div><div>{table}"
            f"<p class=note>This is <b>agreement with the teacher</b> on held-out folds of teacher-labelled inputs, not "
            f"gold {_e(r.get('metric', 'accuracy'))}: more labels make the student a closer copy of the teacher, and "
            f"the teacher's own errors stay. The points are measured ({_e(curve.get('rung', ''))}, labels: agreement — "
            f"{pts}); the expected figures are a {fit_txt}, extrapolated past the largest point by the factor shown, "
            f"with no interval: treat gains under a point or extrapolations past 4x as guesses. The student "
            f"was trained on {_f(curve.get('n_now'), ',')} labels.{price}</p></div></div>")


def per_label_flags(r: dict) -> str:
    """One line over the per-label table naming the labels whose recall the student lost."""
    rec = r.get("per_label_recall") or {}
    flagged = rec.get("flagged") or []
    if not rec:
        return ""
    if not flagged:
        return "<p>No label's recall falls far below the teacher's (" + _e(rec.get("rule", "")) + ").</p>"
    labs = ", ".join(f"<b>{_e(x)}</b> ({_f(rec['labels'][x]['student'], '.0%')} vs {_f(rec['labels'][x]['teacher'], '.0%')})"
                     for x in flagged)
    return (f"<p class=bad>Student recall far below the teacher's on {labs} — {_e(rec.get('rule', ''))}. A student that "
            "learned the label prior over-predicts the common labels (see the predicted column); class weights or "
            "more labels of these classes help.</p>")

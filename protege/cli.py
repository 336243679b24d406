"""The ``protege`` command: thin Typer wrappers over the library's stage functions."""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the Hub behind the user's back
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Distil an expensive model's narrow task into a small, fast student — and prove it.")


class _Console(Console):
    """Piped output (CI logs, `| tee`) has no terminal width; Rich then assumes 80 columns and wraps the
    result tables into unreadable stacks. Give it 120 unless a terminal or COLUMNS says otherwise."""

    @property
    def size(self):
        from rich.console import ConsoleDimensions

        size = super().size
        if self._width is None and not self.is_terminal and not self._environ.get("COLUMNS"):
            return ConsoleDimensions(120, size.height)
        return size

    @size.setter
    def size(self, new_size):
        Console.size.fset(self, new_size)


console = _Console()

TaskArg = typer.Argument(..., help="Path to task.yaml", exists=False)
OutOpt = typer.Option(None, "--out", "-o", help="Artifact folder (default runs/<task name>)")


def _fail(msg: str, code: int = 2) -> None:
    # escape: a message is data ("labels [a, b]", a folder named [v2]), not rich markup; soft_wrap: one error
    # stays one line when piped to a log (rich would otherwise hard-wrap it at 80 columns)
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _load(path: Path):
    from protege.task import load_task

    return load_task(path)


def _guard(fn):
    """Turn the library's clear exceptions into one red line and a non-zero exit."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        from protege.teachers.calls import TeacherUnreachable
        from protege.teachers.ledger import BudgetExceeded
        from protege.task import TaskError

        try:
            return fn(*a, **kw)
        except (TaskError, FileNotFoundError, BudgetExceeded, ValueError, TeacherUnreachable) as e:
            _fail(str(e))

    return wrapper


def _out(task, out: Path | None) -> Path:
    from protege.pipeline import default_out

    return Path(out) if out else default_out(task)


@app.command()
@_guard
def generate(task: Path = TaskArg, out: Path = OutOpt, force: bool = typer.Option(False, help="Ignore the cached artifact"),
             shard: str = typer.Option(None, "--shard", help="i/n: label only shard i of n (0-based), e.g. one per "
                                       "machine; then `protege ledger merge` the ledgers and run generate unsharded"),
             ray: bool = typer.Option(False, "--ray", help="Send the calls from workers on a Ray cluster (pip install "
                                      "'protege\\[ray]'): $RAY_ADDRESS, else a local one"),
             ray_address: str = typer.Option(None, help="--ray on this cluster: auto, ray://head:10001, local")):
    """Label the task's inputs (and gold inputs) with the teacher, through the ledger."""
    import json

    from protege.stages.generate import generate as run_generate, parse_shard

    t = _load(task)
    d = run_generate(t, _out(t, out), force=force, shard=parse_shard(shard), ray=(ray_address or "") if ray or ray_address else None)
    s = json.loads((d / "stats.json").read_text())
    if r := (s.get("inputs") or {}).get("ray"):
        console.print(f"ray: {r['workers']} workers sent {r['calls']} calls (${r['usd']:.4f}) in {r['wall_s']:.1f} s, "
                      f"{r['merged_calls']} merged into the ledger", highlight=False)
    for part in ("inputs", "gold"):
        p = s.get(part) or {}
        fails = ", ".join(f"{k} {v}" for k, v in (p.get("failures") or {}).items())
        console.print(f"{part}: {p.get('requests', 0)} requests, {p.get('cache_hits', 0)} from the ledger, "
                      f"{p.get('calls', 0)} new calls (${p.get('usd', 0.0):.4f}), {p.get('failed', 0)} failed"
                      + (f" ({fails})" if fails else ""), highlight=False)
    console.print(f"generate → {d}")


@app.command()
@_guard
def ledger(args: list[str] = typer.Argument(..., help="A ledger (file, run folder or task.yaml) to show; or: merge "
                                            "DEST SRC... to add ledgers from other machines into DEST"),
           out: Path = OutOpt, as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table")):
    """Spend, calls, cache hits, failures by reason, latency p50/p95 by model and stage; or merge ledgers."""
    import json

    from protege.teachers.ledger import Ledger

    if args[0] == "merge":
        if len(args) < 3:
            _fail("usage: protege ledger merge DEST.sqlite SRC.sqlite [SRC.sqlite ...]")
        dest = Path(args[1])
        with Ledger(dest) as led:
            for src in args[2:]:
                r = led.merge(_ledger_path(Path(src), out))
                console.print(f"merged {r['source']}: +{r['added']} calls, {r['now_ok']} failures replaced by "
                              f"successes → {r['calls']} calls in {dest}", highlight=False)
        return
    if len(args) != 1:
        _fail(f"protege ledger takes one ledger to show (got {len(args)}); to combine ledgers: protege ledger merge DEST SRC...")
    path = _ledger_path(Path(args[0]), out)
    with Ledger(path) as led:
        rows, runs = led.stats(), led.runs(10)
    if as_json:
        print(json.dumps({"ledger": str(path), "stats": rows, "runs": runs}, indent=2))
        return
    tb = Table(title=f"ledger {path}")
    for c in ("model", "stage", "calls", "ok", "failed", "cache hits", "requests", "re-asks", "tokens in/out", "$",
              "p50 s", "p95 s"):
        tb.add_column(c)
    fmt = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
    for r in rows:
        tb.add_row(r["model"], r["stage"], str(r["calls"]), str(r["ok"]), str(r["failed"]), str(r["cache_hits"]),
                   str(r["requests"]), str(r["reasks"]), f"{r['tokens_in']:,}/{r['tokens_out']:,}",
                   f"{r['cost_usd']:.4f}", fmt(r["latency_p50_s"]), fmt(r["latency_p95_s"]))
    console.print(tb)
    for r in rows:
        if r["failures"]:
            console.print(f"failures {r['model']} / {r['stage']}: "
                          + ", ".join(f"{k} {v}" for k, v in r["failures"].items()), highlight=False)
    console.print(f"total: ${sum(r['cost_usd'] for r in rows):.4f} over {sum(r['calls'] for r in rows)} calls")
    for r in runs[:5]:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started_at"]))
        status = "running (or killed)" if r["status"] == "running" else r["status"]
        console.print(f"run {r['id']} {when} {r['stage']}: {status}, {r['calls']} calls, {r['cache_hits']} cached, "
                      f"{r['failed']} failed, ${r['usd']:.4f}" + (f" — {r['note']}" if r.get("note") else ""),
                      highlight=False)


def _ledger_path(p: Path, out: Path | None) -> Path:
    """A ledger file, a run folder holding ledger.sqlite, or a task file (→ its run folder's ledger)."""
    if p.suffix in (".yaml", ".yml"):
        t = _load(p)
        p = _out(t, out) / "ledger.sqlite"
    elif p.is_dir():
        p = p / "ledger.sqlite"
    if not p.is_file():
        raise FileNotFoundError(f"no ledger at {p}: run `protege generate` first, or give the ledger.sqlite path")
    return p


@app.command()
@_guard
def curate(task: Path = TaskArg, out: Path = OutOpt, force: bool = typer.Option(False),
           apply_review: Path = typer.Option(None, "--apply-review", help="Review CSV with corrected_label filled "
                                             "(from `protege review`); kept in the run folder for later runs")):
    """Filter teacher labels (failed, invalid, leaks, length, inconsistent, unsure, duplicates); mix real data."""
    from protege.kinds import kind_of
    from protege.stages.curate import curate as run_curate
    import json

    t = _load(task)
    o = _out(t, out)
    if apply_review is not None:
        from protege.stages.review import store_corrections
        from protege.stages.review_text import store_text_corrections

        dest, new = (store_corrections(apply_review, o, t.labels) if kind_of(t).labelled
                     else store_text_corrections(apply_review, o, t))
        console.print(f"review: {len(new)} corrections read from {apply_review}, stored in {dest}")
    d = run_curate(t, o, force=force)
    s = json.loads((d / "stats.json").read_text())
    console.print(f"curate → {d}: kept {s['n_kept']}/{s['n_in']} teacher labels, dropped {s['dropped'] or 'none'}")
    src = s.get("sources", {})
    console.print(f"training rows: {s.get('n_train', s['n_kept'])} = {src.get('teacher', s['n_kept'])} teacher + "
                  f"{src.get('real', 0)} real + {src.get('review', 0)} reviewed (real weight {s['mix']['real_weight']})")
    rv = s.get("review") or {}
    if rv.get("n_corrections"):
        console.print(f"review: {rv['pool_relabelled']} pool labels changed, {rv['pool_confirmed']} confirmed, "
                      f"{rv['pool_dropped']} dropped; gold (never trained on): {rv['gold_confirmed']} teacher errors "
                      f"confirmed, {len(rv['gold_disputed'])} gold labels disputed"
                      + (f"; {len(rv['unknown_ids'])} unknown ids" if rv["unknown_ids"] else ""))


@app.command()
@_guard
def review(task: Path = TaskArg, out: Path = OutOpt,
           queue: bool = typer.Option(False, "--queue", help="List the gateway's human review queue instead"),
           answer: list[str] = typer.Option(None, "--answer", help="Answer a queued item: ID=LABEL or ID=drop "
                                            "(repeatable); the answers become training data for `protege redistill`"),
           reviewer: str = typer.Option(None, "--reviewer", help="Name recorded with --answer")):
    """Export teacher-vs-gold and teacher-vs-itself disagreements (CSV + HTML) and the teacher's systematic errors.

    With --queue / --answer: list and answer the requests `protege serve` queued for a person."""
    from protege.kinds import kind_of
    from protege.stages.review import export_review
    from protege.stages.review_text import export_text_review

    t = _load(task)
    if queue or answer:
        from protege.cli_serve import review_queue

        return review_queue(t, _out(t, out), answer or [], reviewer, console)
    r = (export_review if kind_of(t).labelled else export_text_review)(t, _out(t, out))
    err, by = r["errors"], r["errors"].get("by", "label")
    if err["n"] and err["per_label"]:
        tb = Table(title=f"teacher vs gold: {err['errors']} of {err['n']} wrong, worst {by}s first")
        for c in (f"gold {by}", "n", "recall", "precision", "most often answered instead"):
            tb.add_column(c)
        for d in err["per_label"]:
            tb.add_row(d["label"], str(d["n"]), "—" if d["recall"] is None else f"{d['recall']:.0%}",
                       "—" if d["precision"] is None else f"{d['precision']:.0%}", d["most_confused_with"] or "—")
        console.print(tb)
    console.print(f"review: {r['n_items']} items {r['reasons']} → {r['csv']}  ({r['html']})")
    what = "a label" if kind_of(t).labelled else "the right answer" + (" as JSON" if kind_of(t).json else "")
    console.print(f"fill {r.get('column', 'corrected_label')} ({what}, or 'drop'), then: protege curate TASK "
                  f"--apply-review {r['csv']}")


@app.command()
@_guard
def baseline(task: Path = TaskArg, out: Path = OutOpt,
             n: int = typer.Option(None, "--n", help="Gold items to use (default baseline.n, 100)"),
             volume: int = typer.Option(None, "--volume", help="Calls per month (default volume_per_month)")):
    """The weekend experiment: teacher vs gold, a small model zero-shot, self-consistency, cost and break-even."""
    from protege.stages.baseline import baseline as run_baseline

    t = _load(task)
    o = _out(t, out)
    _print_baseline(run_baseline(t, o, n=n, volume=volume), o)


def _print_baseline(r: dict, out: Path) -> None:
    from protege.costs import format_months

    tb = Table(title=f"{r['task']}: baseline on {r['n']} gold items")
    for c in ("", f"{r['metric']} [95% CI]", "agree", "invalid", "ms/item", "$/1M calls"):
        tb.add_column(c)
    sm, st = r["small_model"], r["student"]
    for who, d in (("teacher", r["teacher"]), ("small", sm)):
        if "score" not in d:
            continue
        lo, hi = d["score_ci"]
        agr = d.get("agreement_with_teacher")
        tb.add_row(who, f"{d['score']:.3f} [{lo:.3f}, {hi:.3f}]", "—" if agr is None else f"{agr:.3f}",
                   str(d["invalid_answers"]), f"{d['ms_per_item']:.1f}", f"{d['usd_per_1k'] * 1000:.4f}")
    tb.add_row("student", "—", "—", "—", f"{st['ms_per_item']:.3f}", f"{st['usd_per_1k'] * 1000:.4f}")
    console.print(tb)
    console.print(f"teacher: {r['teacher']['name']}; small: " + (f"{sm['name']} ({sm['shots']})" if "score" in sm
                  else sm["skipped"]) + f"; student: {st['kind']}, {st['timing']['source']}", highlight=False)
    c = r["consistency"]
    if c["measured"]:
        console.print(f"teacher self-consistency: {c['consistent']:.1%} of inputs agree across "
                      + ", ".join(f"{k} ({v:.0%})" for k, v in c["agreement_with_base"].items()))
    k = r["cost"]
    console.print(f"cost at {k['volume_per_month']:,} calls/month: teacher ${k['teacher_usd_per_month']:,.2f}/month vs "
                  f"student ${k['student_usd_per_month']:,.2f}/month; one-off ${k['one_off_usd']:,.4f} (label "
                  f"{k['n_inputs_to_label']:,} inputs ${k['labelling_usd']:,.4f} + train ${k['training_usd']:,.4f}"
                  f" + people ${k['engineering_usd']:,.2f}) → break-even {format_months(k['break_even_months'])}, "
                  f"saves ${k['monthly_saving']:,.2f}/month")
    if r.get("machine", {}).get("warning"):
        console.print(f"[yellow]note:[/] {r['machine']['warning']}", highlight=False)
    v = r["verdict"]
    console.print(f"[bold]verdict: {v['decision']}[/]")
    for reason in v["reasons"]:
        console.print(f"  - {reason}", highlight=False)
    console.print(f"baseline: {out / 'baseline' / 'baseline.html'}  ({out / 'baseline' / 'baseline.json'})")


@app.command()
@_guard
def train(task: Path = TaskArg, out: Path = OutOpt, force: bool = typer.Option(False)):
    """Train the student on the curated teacher labels."""
    from protege.stages.train import train as run_train

    t = _load(task)
    d = run_train(t, _out(t, out), force=force)
    console.print(f"train → {d / 'student'}")


@app.command()
@_guard
def evaluate(paths: list[Path] = typer.Argument(..., help="task.yaml; with --compare: run folders (or their report.json)"),
             out: Path = OutOpt,
             compare: bool = typer.Option(False, "--compare", help="Put several runs side by side: protege evaluate --compare RUN RUN...")):
    """Score teacher and student on the held-out gold set; write report.json and report.html."""
    if compare:
        return _compare(paths, out)
    if len(paths) != 1:
        _fail(f"evaluate takes one task file, got {len(paths)} paths; to compare runs use --compare RUN RUN...")
    from protege.stages.evaluate import evaluate as run_evaluate

    t = _load(paths[0])
    o = _out(t, out)
    _print_report(run_evaluate(t, o), o)


def _compare(paths: list[Path], out: Path | None) -> None:
    from protege.reporting.compare import compare_runs

    o = Path(out) if out else Path("runs") / "compare"
    c = compare_runs(paths, o)
    tb = Table(title=f"{len(c['runs'])} runs side by side (paired tests vs {c['baseline']})")
    for col in ("run", "student", "metric", "score ± 95% CI", "retained", "vs first (p)", "cascade cov.", "ms/item",
                "items/s", "$ / 1M calls"):
        tb.add_column(col)
    for x in c["runs"]:
        vs = x["vs_first"]
        tb.add_row(x["run"], x["student"], x["metric"], f"{x['score']:.3f} [{x['score_ci'][0]:.3f}, {x['score_ci'][1]:.3f}]",
                   "—" if x["retained"] is None else f"{x['retained']:.3f}", "baseline" if x is c["runs"][0] else (f"{vs['diff']:+.3f} ({vs['p_value']:.2g})" if vs else "—"),
                   "—" if x["cascade_coverage"] is None else f"{x['cascade_coverage']:.0%}", f"{x['ms_per_item']:.3g}",
                   "—" if not x["items_per_s_batched"] else f"{x['items_per_s_batched']:,.0f}", f"{x['usd_per_1k'] * 1000:.4f}")
    console.print(tb)
    console.print(f"compare: {o / 'compare.html'}  ({o / 'compare.json'})")


@app.command()
@_guard
def run(task: Path = TaskArg, out: Path = OutOpt, force: bool = typer.Option(False, help="Re-run every stage")):
    """generate → curate → train → evaluate, skipping stages whose artifact is up to date."""
    from protege.pipeline import run as run_all

    t = _load(task)
    o = _out(t, out)
    _print_report(run_all(t, o, force=force).report.to_dict(), o)


@app.command()
@_guard
def demo(out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Where to write the run and report")):
    """Run the whole loop offline on the bundled BBC News example (local teacher, no API key)."""
    from protege.demo import demo_task
    from protege.pipeline import run as run_all

    t0 = time.perf_counter()
    task = demo_task(Path(out) / "task")
    console.print(f"[bold]protege demo[/]: {task.name} — teacher {task.teacher.model}, student {task.student.kind}")
    report = run_all(task, Path(out)).report.to_dict()
    _print_report(report, Path(out))
    console.print(f"demo finished in {time.perf_counter() - t0:.0f} s")


def _print_report(r: dict, out: Path) -> None:
    tb = Table(title=f"{r['task']}: {r['metric']} on {r['n_eval']} held-out gold items")
    for c in ("", "model", "score ± 95% CI", "agreement", "ms/item", "$ / 1M calls"):
        tb.add_column(c)
    def f(x, spec: str) -> str:
        return "—" if x is None else format(x, spec)

    for who in ("teacher", "student"):
        d = r[who]
        lo, hi = d["score_ci"]
        tb.add_row(who, d["name"], f"{d['score']:.3f} [{f(lo, '.3f')}, {f(hi, '.3f')}]",
                   "—" if who == "teacher" else f(d.get("agreement"), ".3f"), f(d["ms_per_item"], ".3f"),
                   f(None if d["usd_per_1k"] is None else d["usd_per_1k"] * 1000, ".4f"))
    console.print(tb)
    from protege.reporting.fmt import speed_words

    single, batched = speed_words(r["speedup"]) or "—", speed_words(r.get("speedup_batched")) or "—"
    console.print(f"retained [bold]{f(r['retained'], '.3f')}[/]   speedup: [bold]{single}[/] (single item), {batched} batched")
    for why in (r.get("notes") or {}).values():
        console.print(f"note: {why}", highlight=False)
    j = r.get("judge")
    if j:
        console.print(f"judge ({j['judge']}): student win rate {f(j.get('student_win_rate'), '.3f')} "
                      f"[{f(j['win_rate_ci'][0], '.3f')}, {f(j['win_rate_ci'][1], '.3f')}] — {j['wins']} wins, "
                      f"{j['ties']} ties, {j['losses']} losses over {j['n']} items (both orders)", highlight=False)
    console.print(f"report: {out / 'report.html'}  ({out / 'report.json'})")


# ---- export, serve, drift, redistill (stages 6-7; implemented in cli_serve.py) --------------------
from protege.cli_serve import register as _register_serve  # noqa: E402

_register_serve(app, guard=_guard, load=_load, out_of=_out, fail=_fail, console=console)


if __name__ == "__main__":  # pragma: no cover
    app()

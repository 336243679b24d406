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
console = Console()

TaskArg = typer.Argument(..., help="Path to task.yaml", exists=False)
OutOpt = typer.Option(None, "--out", "-o", help="Artifact folder (default runs/<task name>)")


def _fail(msg: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {msg}", highlight=False)
    raise typer.Exit(code)


def _load(path: Path):
    from .task import load_task

    return load_task(path)


def _guard(fn):
    """Turn the library's clear exceptions into one red line and a non-zero exit."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        from .ledger import BudgetExceeded
        from .task import TaskError

        try:
            return fn(*a, **kw)
        except (TaskError, FileNotFoundError, BudgetExceeded, ValueError) as e:
            _fail(str(e))

    return wrapper


def _out(task, out: Path | None) -> Path:
    from .pipeline import default_out

    return Path(out) if out else default_out(task)


@app.command()
@_guard
def generate(task: Path = TaskArg, out: Path = OutOpt, force: bool = typer.Option(False, help="Ignore the cached artifact")):
    """Label the task's inputs (and gold inputs) with the teacher, through the ledger."""
    from .generate import generate as run_generate

    t = _load(task)
    d = run_generate(t, _out(t, out), force=force)
    console.print(f"generate → {d}")


@app.command()
@_guard
def curate(task: Path = TaskArg, out: Path = OutOpt, force: bool = typer.Option(False)):
    """Drop teacher labels that are failed, invalid or below the confidence threshold."""
    from .curate import curate as run_curate
    import json

    t = _load(task)
    d = run_curate(t, _out(t, out), force=force)
    s = json.loads((d / "stats.json").read_text())
    console.print(f"curate → {d}: kept {s['n_kept']}/{s['n_in']}, dropped {s['dropped'] or 'none'}")


@app.command()
@_guard
def train(task: Path = TaskArg, out: Path = OutOpt, force: bool = typer.Option(False)):
    """Train the student on the curated teacher labels."""
    from .train import train as run_train

    t = _load(task)
    d = run_train(t, _out(t, out), force=force)
    console.print(f"train → {d / 'student'}")


@app.command()
@_guard
def evaluate(task: Path = TaskArg, out: Path = OutOpt):
    """Score teacher and student on the held-out gold set; write report.json and report.html."""
    from .evaluate import evaluate as run_evaluate

    t = _load(task)
    o = _out(t, out)
    _print_report(run_evaluate(t, o), o)


@app.command()
@_guard
def run(task: Path = TaskArg, out: Path = OutOpt, force: bool = typer.Option(False, help="Re-run every stage")):
    """generate → curate → train → evaluate, skipping stages whose artifact is up to date."""
    from .pipeline import run as run_all

    t = _load(task)
    o = _out(t, out)
    _print_report(run_all(t, o, force=force), o)


@app.command()
@_guard
def demo(out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Where to write the run and report")):
    """Run the whole loop offline on the bundled BBC News example (local teacher, no API key)."""
    from .pipeline import demo_task, run as run_all

    t0 = time.perf_counter()
    task = demo_task(Path(out) / "task")
    console.print(f"[bold]protege demo[/]: {task.name} — teacher {task.teacher.model}, student {task.student.kind}")
    report = run_all(task, Path(out))
    _print_report(report, Path(out))
    console.print(f"demo finished in {time.perf_counter() - t0:.0f} s")


def _print_report(r: dict, out: Path) -> None:
    tb = Table(title=f"{r['task']}: {r['metric']} on {r['n_eval']} held-out gold items")
    for c in ("", "model", "score ± 95% CI", "agreement", "ms/item", "$ / 1M calls"):
        tb.add_column(c)
    for who in ("teacher", "student"):
        d = r[who]
        lo, hi = d["score_ci"]
        tb.add_row(who, d["name"], f"{d['score']:.3f} [{lo:.3f}, {hi:.3f}]",
                   "—" if who == "teacher" else f"{d['agreement']:.3f}", f"{d['ms_per_item']:.3f}",
                   f"{d['usd_per_1k'] * 1000:.4f}")
    console.print(tb)
    console.print(f"retained [bold]{r['retained']:.3f}[/]   speedup [bold]{r['speedup']:.0f}x[/] (single item), "
                  f"{r['speedup_batched']:.0f}x batched")
    console.print(f"report: {out / 'report.html'}  ({out / 'report.json'})")


if __name__ == "__main__":  # pragma: no cover
    app()

"""Rich progress bars for long stages; a no-op when quiet (tests, libraries embedding protege).

Two switches: ``QUIET["on"]`` silences every bar in the process (tests, benchmarks); :func:`quiet` silences
the bars of one block only, in the thread / async task that runs it (a context variable), so a server that
wants no bar per request leaves bars elsewhere in the same process alone.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
QUIET = {"on": False}
_QUIET_HERE: ContextVar[bool] = ContextVar("protege_progress_quiet", default=False)


def is_quiet() -> bool:
    """True when bars are off: process-wide, or inside a :func:`quiet` block of this thread / task."""
    return QUIET["on"] or _QUIET_HERE.get()


@contextmanager
def quiet(on: bool = True) -> Iterator[None]:
    """No progress bars inside this block, in this thread / async task only; ``on=False`` is a no-op."""
    if not on:
        yield
        return
    token = _QUIET_HERE.set(True)
    try:
        yield
    finally:
        _QUIET_HERE.reset(token)


@contextmanager
def bar(description: str, total: int) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, **fields)``; fields (e.g. cached=, usd=) are shown after the bar."""
    if is_quiet() or total <= 0:
        yield lambda n=1, **kw: None
        return
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*cols, console=console, transient=False) as p:
        t = p.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields: object) -> None:
            info = "  ".join(f"{k}={v}" for k, v in fields.items())
            p.update(t, advance=n, info=info)

        yield advance

"""Rich progress bars for long stages; a no-op when quiet (tests, libraries embedding protege)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
QUIET = {"on": False}


@contextmanager
def bar(description: str, total: int) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, **fields)``; fields (e.g. cached=, usd=) are shown after the bar."""
    if QUIET["on"] or total <= 0:
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

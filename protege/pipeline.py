"""``run``: generate → curate → train → evaluate, each skipped when its artifact is up to date."""

from __future__ import annotations

import shutil
from pathlib import Path

from .curate import curate
from .evaluate import evaluate
from .generate import generate
from .task import TaskSpec, load_task
from .train import train

EXAMPLE_DIR = Path(__file__).resolve().parent.parent / "examples" / "bbc-topics"


def default_out(task: TaskSpec) -> Path:
    return Path("runs") / task.name


def run(task: TaskSpec, out: Path | None = None, *, force: bool = False) -> dict:
    out = Path(out or default_out(task))
    generate(task, out, force=force)
    curate(task, out, force=force)
    train(task, out, force=force)
    return evaluate(task, out)


def demo_task(dest: Path) -> TaskSpec:
    """The bundled BBC example, copied into ``dest`` (so the repo stays clean) and loaded."""
    if not (EXAMPLE_DIR / "task.yaml").is_file():
        raise FileNotFoundError(f"bundled example not found at {EXAMPLE_DIR}; install protege from its repository "
                                f"(pip install -e .) so examples/ is available")
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("task.yaml", "inputs.jsonl", "gold.jsonl"):
        if not (dest / name).exists() or (dest / name).stat().st_mtime < (EXAMPLE_DIR / name).stat().st_mtime:
            shutil.copy2(EXAMPLE_DIR / name, dest / name)
    return load_task(dest / "task.yaml")

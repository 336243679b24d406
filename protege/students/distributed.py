"""Process topology under ``accelerate launch`` / torchrun / DeepSpeed: which rank writes, barriers, and a
scratch folder every rank of one launch agrees on. A leaf module: the trainers import it, nothing else."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

def is_main_process() -> bool:
    """True outside distributed runs; under ``accelerate launch`` (any launcher setting RANK) on rank 0 only."""
    return int(os.environ.get("RANK", "0")) == 0


def wait_for_everyone() -> None:
    """Barrier across ranks when a process group is up (the Trainer starts it); else nothing."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextmanager
def work_dir(prefix: str, given=None):
    """Scratch folder for Trainer checkpoints, the same path on every rank of one launch.

    Under ``accelerate launch`` the ranks must agree on ``output_dir``: rank 0 writes checkpoints and
    every rank reads the best one back. Ranks of one launch share the launcher as parent process (and
    torchrun's run id); across machines pass a folder on a shared filesystem (``given``).
    """
    import shutil
    import tempfile

    if given is not None:
        yield str(given)
        return
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        with tempfile.TemporaryDirectory(prefix=prefix) as d:
            yield d
        return
    run = os.environ.get("TORCHELASTIC_RUN_ID") or str(os.getppid())
    d = Path(tempfile.gettempdir()) / f"{prefix}{run}"
    d.mkdir(parents=True, exist_ok=True)
    try:
        yield str(d)
    finally:
        wait_for_everyone()
        if is_main_process():
            shutil.rmtree(d, ignore_errors=True)


def multi_process_cpu() -> bool:
    """A multi-process launch on a machine without CUDA: the Trainer must be told ``use_cpu`` to run DDP
    over gloo (otherwise every rank trains alone on all the data)."""
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()



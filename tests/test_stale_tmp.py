"""kill -9 inside a stage leaves its ``.<stage>.tmp-*`` folder behind; the next run of that stage removes it.

The kill is real: a child process enters :func:`protege.artifacts.stage_writer`, writes a file and
SIGKILLs itself. A temp folder whose owner is still alive is left alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from protege.artifacts import atomic_dir, stage_writer

CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from protege.artifacts import stage_writer
    with stage_writer(Path(sys.argv[1]), {"stage": "train"}) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
""")


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.tmp-") or p.name.startswith(f".{name}.old-"))


def test_kill_9_leftover_is_cleaned_by_the_next_run(tmp_path):
    dest = tmp_path / "run" / "train"
    r = subprocess.run([sys.executable, "-c", CHILD, str(dest)], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    assert len(_leftovers(dest.parent, "train")) == 1 and not dest.exists()  # what kill -9 leaves
    with stage_writer(dest, {"stage": "train"}) as tmp:
        (tmp / "model.bin").write_bytes(b"ok")
    assert (dest / "model.bin").read_bytes() == b"ok"
    assert _leftovers(dest.parent, "train") == []


def test_live_owner_and_other_stages_are_left_alone(tmp_path):
    parent = tmp_path / "run"
    parent.mkdir()
    mine = parent / f".curate.tmp-{os.getpid()}-abcd1234"  # a live process (this one) is writing it
    mine.mkdir()
    other = parent / ".train.tmp-1-zzzz"  # another stage's: its own next run decides
    other.mkdir()
    legacy_new = parent / ".curate.tmp-k2j3h4g5"  # no pid in the name (older protege): judged by age
    legacy_new.mkdir()
    legacy_old = parent / ".curate.tmp-a1b2c3d4"
    legacy_old.mkdir()
    old = time.time() - 3 * 86400
    os.utime(legacy_old, (old, old))
    with atomic_dir(parent / "curate") as tmp:
        (tmp / "x").write_text("1")
    left = _leftovers(parent, "curate")
    assert mine.name in left and legacy_new.name in left and legacy_old.name not in left
    assert other.is_dir()

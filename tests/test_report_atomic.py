"""report.json and report.html are one unit: a kill -9 at any point of ``evaluate``'s writing leaves either
the old pair or the new pair, never a new report.json beside the old report.html (or the reverse).

A child process runs :func:`protege.stages.evaluate.classify.write_outputs` and SIGKILLs itself just before its N-th
rename (every file write is temp file + rename), for every N until one run finishes unkilled.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import protege.reporting.html
    from protege.stages.evaluate.common import write_outputs

    out, marker, kill_at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    protege.reporting.html.render_html = lambda r: f"<html>{r['marker']}</html>"
    n = 0
    def counting(real):
        def f(*a, **kw):
            global n
            n += 1
            if n == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **kw)
        return f
    os.replace, os.rename = counting(os.replace), counting(os.rename)
    write_outputs(out, {"marker": marker, "task": "t"}, [{"id": "a"}], {"stage": "evaluate", "fingerprint": marker})
""")


def _write(out: Path, marker: str, kill_at: int = 0) -> int:
    return subprocess.run([sys.executable, "-c", CHILD, str(out), marker, str(kill_at)],
                          capture_output=True, text=True).returncode


def _pair(out: Path) -> tuple[str | None, str | None]:
    j, h = out / "report.json", out / "report.html"
    return (json.loads(j.read_text())["marker"] if j.exists() else None,
            h.read_text().removeprefix("<html>").removesuffix("</html>") if h.exists() else None)


def test_kill_at_every_rename_leaves_a_matching_pair(tmp_path):
    seen = []
    for kill_at in range(1, 30):
        out = tmp_path / f"run{kill_at}"
        assert _write(out, "old") == 0 and _pair(out) == ("old", "old")
        rc = _write(out, "new", kill_at)
        j, h = _pair(out)
        seen.append((kill_at, rc, j, h))
        assert j == h, f"killed before rename #{kill_at}: report.json is {j!r}, report.html is {h!r}"
        if rc == 0:
            assert (j, h) == ("new", "new")
            break
    else:
        raise AssertionError(f"write_outputs never finished: {seen}")
    assert any(r[1] == -9 for r in seen)
    again = tmp_path / "run1"  # a re-run after the kill writes the new pair as usual
    assert _write(again, "newer") == 0 and _pair(again) == ("newer", "newer")
    assert json.loads((again / "evaluate" / "config.json").read_text())["fingerprint"] == "newer"

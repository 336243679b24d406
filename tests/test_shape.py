"""The package's shape holds: no import cycles (imports inside functions count), no module over 400 lines,
and ruff is clean. These fail on the change that breaks them, not in a review months later."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "protege"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> protege modules it imports, anywhere in its body (a function-level import is still an edge)."""
    mods = _modules()
    graph = {}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                deps.add(src)
                deps.update(f"{src}.{a.name}" for a in node.names)
        graph[mod] = {d for d in deps if d in mods and d != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle_hidden_in_a_function():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_inside_protege():
    found = cycles(import_graph())
    assert not found, "import cycles (an import inside a function counts): " + "; ".join(" <-> ".join(c) for c in found)


def test_no_module_over_400_lines():
    big = {m: n for m, p in _modules().items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them by what they do): {big}"


def test_import_protege_is_cheap():
    """``import protege`` (and the CLI's startup) must not import torch / transformers."""
    code = "import sys, protege, protege.task; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    root = PKG.parent
    r = subprocess.run([ruff, "check", "protege", "tests", "bench", "examples"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]


TASK_KINDS = {"classify", "extract", "generate"}
KIND_DISPATCH = {"protege.kinds", "protege.task"}  # the kinds themselves, and the task file's validation


def _kind_comparisons(tree: ast.AST) -> list[int]:
    """Lines comparing something to a task-kind name ("classify" / "extract" / "generate")."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            consts = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
            consts += [e for c in node.comparators if isinstance(c, (ast.Tuple, ast.List, ast.Set)) for e in c.elts
                       if isinstance(e, ast.Constant)]
            if any(c.value in TASK_KINDS for c in consts):
                lines.append(node.lineno)
    return lines


def test_kind_comparisons_are_found():
    assert _kind_comparisons(ast.parse('if task.kind == "extract" or k in ("generate", "x"): pass')) == [1, 1]
    assert _kind_comparisons(ast.parse('if s.kind == "static": pass')) == []


def test_task_kind_is_compared_only_where_kinds_dispatch():
    """Stages ask the kind (protege.kinds) what differs; only kinds.py and the task file's validation name kinds,
    and stage packages dispatch with a BY_KIND table."""
    found = {m: ln for m, p in _modules().items() if m not in KIND_DISPATCH
             and (ln := _kind_comparisons(ast.parse(p.read_text(encoding="utf-8"))))}
    assert not found, f"task-kind comparisons outside protege.kinds: {found}"

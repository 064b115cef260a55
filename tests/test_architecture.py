"""The layers of DESIGN.md hold in the source: imports go downward only, no cycles, short functions.

Read with ``ast`` (nothing is executed), so imports inside function bodies count like any other.
"""
import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Folder -> package, as pyproject's package-dir installs them.
PACKAGES = {"sigscale": "sigscale", "pretrain": "sigscale.pretrain", "curation": "sigscale.curation",
            "eval": "sigscale.eval", "slurm": "sigscale.slurm"}
# What each layer may import (besides itself). The top layer composes the stages.
ALLOWED = {
    "core": {"core"},
    "pretrain": {"core"},
    "curation": {"core", "pretrain"},
    "eval": {"core", "pretrain"},
    "slurm": {"core", "pretrain", "curation", "eval"},
    "top": {"core", "pretrain", "curation", "eval", "slurm"},
}
MAX_FUNCTION_LINES = 80


def modules() -> Dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def layer(module: str) -> str:
    if module == "sigscale" or module.startswith("sigscale.core"):
        return "core"
    for stage in ("pretrain", "curation", "eval", "slurm"):
        if module.startswith(f"sigscale.{stage}"):
            return stage
    return "top"  # sigscale.cli, sigscale.demo, sigscale.bench_*


def imports_of(path: Path, known: Set[str]) -> Set[str]:
    """The sigscale modules a file imports anywhere in it (a name imported from a package counts as its module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name.startswith("sigscale"):
                found.add(name)
    return found


@pytest.fixture(scope="module")
def graph() -> Dict[str, Set[str]]:
    mods = modules()
    return {m: imports_of(p, set(mods)) - {m} for m, p in mods.items()}


def test_the_scan_sees_the_stages(graph):
    assert {"sigscale.pretrain.train", "sigscale.eval.run", "sigscale.core.config", "sigscale.cli"} <= set(graph)
    assert "sigscale.pretrain.checkpoint" in graph["sigscale.pretrain.train"]


def test_imports_go_downward_only(graph):
    upward = [f"{m} ({layer(m)}) imports {d} ({layer(d)})" for m, deps in sorted(graph.items()) for d in sorted(deps)
              if layer(d) != layer(m) and layer(d) not in ALLOWED[layer(m)]]
    assert not upward, "\n".join(upward)


def test_no_import_cycles(graph):
    """Tarjan's strongly connected components over the module graph; any component of size > 1 is a cycle."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    # The package __init__ files are imported by every submodule; a package importing its children is not a cycle.
    cycles = [c for c in cycles if not all(m in PACKAGES.values() or m == "sigscale" for m in c)]
    assert not cycles, cycles


def test_shipped_functions_are_short():
    long = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "\n".join(long)


def test_a_planted_upward_import_is_caught(tmp_path):
    """The scan is not vacuous: an eval import inside a pretrain function body is reported."""
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from sigscale.eval.run import evaluate\n")
    deps = imports_of(planted, set(modules()))
    assert deps == {"sigscale.eval.run"} and layer("sigscale.eval.run") not in ALLOWED["pretrain"]

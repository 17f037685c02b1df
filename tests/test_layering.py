"""The floors of the code (README "Layout"): every import inside ``python/astra`` —
module level or inside a function — points down or sideways within a floor, never up,
and never in a circle; ``astra_kernels`` never imports ``astra``.

The import graph is read from the source with :mod:`ast`, so a test run needs no
optional dependency and an import hidden in a function counts like any other.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"astra": ROOT / "python" / "astra", "astra_kernels": ROOT / "astra_kernels"}

# top (1) to bottom (6); a module may import its own floor and the floors below it
FLOORS = [
    ("cli", ["astra.cli"]),
    ("applications", ["astra.demo", "astra.bench", "astra.evaluate", "astra.evaluate_llm",
                      "astra.finetune", "astra.plots", "astra.textgen"]),
    ("execution", ["astra.parallel"]),
    ("catalogue", ["astra.catalog", "astra.zoo"]),
    ("core", ["astra", "astra.attention", "astra.layout", "astra.kmeans", "astra.codebooks",
              "astra.calibrate", "astra.models", "astra.patch", "astra.cache", "astra.data",
              "astra.checkpoint", "astra.generation", "astra.decode", "astra.remote",
              "astra.codes",
              "astra.objectives",
              "astra.options"]),
    ("kernels", ["astra_kernels"]),
]


def _modules() -> Dict[str, Path]:
    mods = {}
    for pkg, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = [pkg, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str:
    """The module that ``name`` (a module or ``module.attribute``) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports_of(mod: str) -> Set[str]:
    """Project modules that ``mod`` imports anywhere in its source."""
    path = MODULES[mod]
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            target = _resolve(n)
            if target and target != mod:
                out.add(target)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def floor_of(mod: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if rank is None:
        raise AssertionError(f"{mod} is on no floor: add it to FLOORS in {__file__}")
    return rank


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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


def test_the_graph_is_read():
    # the checks below are only as good as the graph: it must see known edges
    assert "astra.parallel.worker" in GRAPH["astra.parallel.runner"] or \
        "astra.parallel.launcher" in GRAPH["astra.parallel.runner"]
    assert "astra.catalog" in GRAPH["astra.cli.run"] or any(
        m.startswith("astra.catalog") for m in GRAPH["astra.cli.run"])
    assert "astra_kernels" in GRAPH["astra.attention"]


def test_no_import_cycle_in_the_framework():
    framework = {m: {t for t in ts if t == "astra" or t.startswith("astra.")}
                 for m, ts in GRAPH.items() if m == "astra" or m.startswith("astra.")}
    assert _cycles(framework) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_imports_point_down(mod):
    up = sorted(t for t in GRAPH[mod] if floor_of(t) < floor_of(mod))
    assert not up, (f"{mod} (floor {FLOORS[floor_of(mod)][0]}) imports "
                    + ", ".join(f"{t} (floor {FLOORS[floor_of(t)][0]})" for t in up))


def test_execution_floor_imports_no_application_or_cli():
    banned = ("astra.bench", "astra.demo", "astra.cli", "astra.finetune")
    bad = {m: sorted(t for t in GRAPH[m] if t.startswith(banned))
           for m in MODULES if m.startswith("astra.parallel")}
    assert not any(bad.values()), bad


def test_the_parsers_constants_import_nothing():
    # astra.options is read while the command line parses, before torch is imported
    tree = ast.parse(MODULES["astra.options"].read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_kernels_never_import_the_framework():
    bad = {m: sorted(t for t in GRAPH[m] if t == "astra" or t.startswith("astra."))
           for m in MODULES if m.startswith("astra_kernels")}
    assert not any(bad.values()), bad


# Size rules of the framework: a file has one job its name says, a function one step.
MAX_FILE_LINES, MAX_FUNCTION_LINES = 600, 100


@pytest.mark.parametrize("mod", sorted(m for m in MODULES if m.split(".")[0] == "astra"))
def test_files_and_functions_stay_small(mod):
    path = MODULES[mod]
    text = path.read_text()
    assert text.count("\n") <= MAX_FILE_LINES, f"{path}: {text.count(chr(10))} lines"
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for n in ast.walk(ast.parse(text))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path}: " + ", ".join(long)

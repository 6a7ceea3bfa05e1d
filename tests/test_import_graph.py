"""The package has no import circles.

Every ``import`` / ``from ... import`` statement inside the package is read with ``ast``
(module level and inside functions alike: a lazy import that closes a circle is still a
circle a reader must untangle), resolved to a module of the package, and the resulting
graph must be acyclic. ``triton_kernels/`` is installed as ``cacheaug_engine.triton_kernels``
(setup.py) and is read under that name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "cacheaug_engine"
# source folder -> installed package name
SOURCES = {ROOT / "cacheaug_engine": PACKAGE, ROOT / "triton_kernels": f"{PACKAGE}.triton_kernels"}


def package_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (``pkg`` for ``pkg/__init__.py``)."""
    mods: dict[str, Path] = {}
    for src, name in SOURCES.items():
        for path in sorted(src.rglob("*.py")):
            parts = list(path.relative_to(src).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([name, *parts])] = path
    return mods


def _targets(node: ast.AST, module: str, is_pkg: bool, mods: dict[str, Path]) -> set[str]:
    """Package modules that one import statement loads."""
    out: set[str] = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name in mods:
                out.add(alias.name)
        return out
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        if sub in mods:  # ``from pkg import submodule``
            out.add(sub)
        elif source in mods:  # a name defined in that module (or package __init__)
            out.add(source)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in its body)."""
    mods = package_modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps |= _targets(node, name, is_pkg, mods)
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None when the graph is acyclic (iterative DFS)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_graph_sees_the_package():
    graph = import_graph()
    # the reader resolves relative, absolute, lazy and submodule imports
    assert "cacheaug_engine.startup" in graph["cacheaug_engine.train"]
    assert "cacheaug_engine.triton_kernels.common" in graph["cacheaug_engine.triton_kernels.segment_attention_bwd"]
    assert "cacheaug_engine.ops.decode_common" in graph["cacheaug_engine.triton_kernels.decode"]
    assert "cacheaug_engine.demo" in graph["cacheaug_engine.cli"]  # a lazy import inside a function


@pytest.mark.parametrize(
    "graph, cycle",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
        ({"a": {"b", "c"}, "b": {"c"}, "c": {"d"}, "d": {"b"}}, ["b", "c", "d", "b"]),
    ],
)
def test_find_cycle(graph, cycle):
    assert find_cycle(graph) == cycle


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle inside the package: " + " -> ".join(cycle or [])

"""The house: no import circles, rooms that import only downwards, a leaf kernel package.

Every ``import`` / ``from ... import`` statement inside the package is read with ``ast``
(module level and inside functions alike: a lazy import that closes a circle is still a
circle a reader must untangle), and so is every ``importlib.import_module("literal")`` /
``__import__("literal")`` call; each is resolved to a module of the package, and the resulting
graph must be acyclic. A load by a computed name is invisible to such a reader, so it is allowed
only where a caller names the module on purpose (``DYNAMIC_LOADS``). ``triton_kernels/`` is
installed as ``cacheaug_engine.triton_kernels`` (setup.py) and is read under that name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
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
        if sub == f"{PACKAGE}._C":  # the compiled extension: no Python module, imports nothing back
            continue
        if sub in mods:  # ``from pkg import submodule``
            out.add(sub)
        elif source in mods:  # a name defined in that module (or package __init__)
            out.add(source)
    return out


def _dynamic_target(node: ast.AST) -> tuple[bool, str | None]:
    """(is a dynamic load, its literal module name or None) for ``importlib.import_module(...)`` /
    ``__import__(...)`` calls."""
    if not isinstance(node, ast.Call):
        return False, None
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name not in ("import_module", "__import__"):
        return False, None
    arg = node.args[0] if node.args else None
    return True, arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None


# Modules that load a module by a name their caller gives (a registry reference such as
# "tests_module:KERNELS" handed to worker processes); every other load names its module in the code.
DYNAMIC_LOADS = {"cacheaug_engine.tooling.kernel_sweep", "cacheaug_engine.triton_kernels.kernel_specs"}


def dynamic_loads() -> dict[str, list[str | None]]:
    """module -> the names it loads through importlib / __import__ (None: computed at run time)."""
    out: dict[str, list[str | None]] = {}
    for name, path in package_modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            dynamic, target = _dynamic_target(node)
            if dynamic:
                out.setdefault(name, []).append(target)
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
            dynamic, target = _dynamic_target(node)
            if dynamic and target is not None:  # importlib with a literal name: an edge like any import
                deps |= {max((m for m in mods if target == m or target.startswith(m + ".")), key=len, default=name)}
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
    assert "cacheaug_engine.device" in graph["cacheaug_engine.train.trainer"]
    assert "cacheaug_engine.triton_kernels.common" in graph["cacheaug_engine.triton_kernels.segment_attention_bwd"]
    assert "cacheaug_engine.triton_kernels.host" in graph["cacheaug_engine.triton_kernels.decode"]
    assert "cacheaug_engine.models.loaders" in graph["cacheaug_engine.cli.demo"]  # a lazy import inside a function
    assert "cacheaug_engine.triton_kernels.decode" in graph["cacheaug_engine.ops.plan"]  # lazy, first use


def test_graph_sees_importlib_loads(tmp_path, monkeypatch):
    pkg = tmp_path / "cacheaug_engine"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import importlib\nimportlib.import_module('cacheaug_engine.b')\n")
    (pkg / "b.py").write_text("__import__('cacheaug_engine.a')\n")
    (pkg / "c.py").write_text("import importlib\nname = 'x'\nimportlib.import_module(name)\n")
    monkeypatch.setitem(SOURCES, pkg, PACKAGE)
    for src in [s for s in SOURCES if s != pkg]:
        monkeypatch.delitem(SOURCES, src)
    graph = import_graph()
    assert graph["cacheaug_engine.a"] == {"cacheaug_engine.b"} and graph["cacheaug_engine.b"] == {"cacheaug_engine.a"}
    assert find_cycle(graph) == ["cacheaug_engine.a", "cacheaug_engine.b", "cacheaug_engine.a"]
    assert dynamic_loads()["cacheaug_engine.c"] == [None]


def test_no_load_by_computed_name_outside_registries():
    computed = {m for m, targets in dynamic_loads().items() if None in targets}
    assert computed <= DYNAMIC_LOADS, f"modules loading by a computed name: {sorted(computed - DYNAMIC_LOADS)}"


# Rooms from the bottom up: a module may import its own room and the rooms below it, never above.
ROOMS = (
    "triton_kernels", "(top)", "ops", "models", "data", "augment", "generation", "eval", "train", "integrations",
    "tooling", "bench", "cli",
)


def room_of(module: str) -> str:
    """The room of a package module: its first folder below the package, or "(top)"."""
    parts = module.split(".")
    if len(parts) == 1:
        return "(top)"
    return parts[1] if parts[1] in ROOMS else "(top)"


def test_rooms_import_only_downwards():
    rank = {room: i for i, room in enumerate(ROOMS)}
    up = sorted(
        f"{m} -> {d}" for m, deps in import_graph().items() for d in deps
        if m != PACKAGE and rank[room_of(d)] > rank[room_of(m)]
    )
    assert not up, "imports that run back up the house:\n" + "\n".join(up)


def test_kernels_are_a_leaf_and_tooling_is_never_imported_by_the_runtime():
    graph = import_graph()
    for m, deps in graph.items():
        if room_of(m) == "triton_kernels":
            assert all(room_of(d) == "triton_kernels" for d in deps), (m, deps)
        if room_of(m) not in ("tooling", "cli"):
            assert not any(room_of(d) == "tooling" for d in deps), (m, deps)
    # the kernels import only triton, torch and the standard library
    import sys

    allowed = {"triton", "torch", "__future__"} | set(sys.stdlib_module_names)
    for path in (ROOT / "triton_kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            assert all(n.split(".")[0] in allowed for n in names), f"{path.name} imports {names}"


def test_few_modules_at_the_top():
    top = sorted(p.name for p in (ROOT / PACKAGE).glob("*.py"))
    assert len(top) <= 6, top


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

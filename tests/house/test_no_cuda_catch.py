"""No test passes by catching "no CUDA device" (issue 28).

A test of the cuda backend that accepts NoCudaDeviceError (or BackendUnavailableError) among other
outcomes passes on every CPU machine whatever the code does. Only a test that asserts that error
alone, as the behaviour under test (e.g. tests/ops/test_cuda_ext.py's no-GPU contract), may name it:
``pytest.raises`` with a tuple containing it, or an ``except`` clause catching it, is refused.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
CAUGHT = ("NoCudaDeviceError", "BackendUnavailableError")


def _names(node: ast.AST) -> set[str]:
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
    return out


def _offences(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "raises":
            if node.args and isinstance(node.args[0], ast.Tuple) and _names(node.args[0]) & set(CAUGHT):
                found.append(f"{path.relative_to(TESTS)}:{node.lineno}: pytest.raises with a tuple that accepts "
                             f"{sorted(_names(node.args[0]) & set(CAUGHT))}")  # fmt: skip
        if isinstance(node, ast.ExceptHandler) and node.type is not None and _names(node.type) & set(CAUGHT):
            found.append(f"{path.relative_to(TESTS)}:{node.lineno}: except clause catches "
                         f"{sorted(_names(node.type) & set(CAUGHT))}")  # fmt: skip
    return found


def test_no_test_accepts_a_missing_cuda_device_as_a_pass():
    files = sorted(p for p in TESTS.rglob("*.py") if p.name != Path(__file__).name)
    assert len(files) > 20
    offences = [o for f in files for o in _offences(f)]
    assert not offences, "\n".join(offences)


def test_the_scan_sees_an_offence(tmp_path):
    bad = tmp_path / "test_bad.py"
    bad.write_text(
        "import pytest\n"
        "def test_x(C):\n"
        "    with pytest.raises((ValueError, C.NoCudaDeviceError)):\n"
        "        pass\n"
        "    try:\n"
        "        pass\n"
        "    except BackendUnavailableError:\n"
        "        pass\n",
        encoding="utf-8",
    )
    global TESTS
    saved, TESTS = TESTS, tmp_path
    try:
        assert len(_offences(bad)) == 2
    finally:
        TESTS = saved

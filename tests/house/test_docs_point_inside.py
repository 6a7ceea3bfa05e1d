"""Docstrings and comments point at files inside this repository.

Every ``something.py`` the package, kernels and benchmarks name must be a file of the
repository, and nothing names a document kept outside it (``../`` paths, DESIGN.md).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("cacheaug_engine", "triton_kernels", "bench")
PY_NAME = re.compile(r"[\w./-]*\w\.py\b")
OUTSIDE = re.compile(r"\.\./|DESIGN\.md")


def _sources() -> list[Path]:
    return [p for f in FOLDERS for p in sorted((ROOT / f).rglob("*.py"))] + [ROOT / "README.md"]


def test_named_python_files_exist():
    names = {p.name for p in ROOT.rglob("*.py") if ".git" not in p.parts}
    missing = []
    for path in _sources():
        for m in PY_NAME.finditer(path.read_text(encoding="utf-8")):
            if m.group(0).rsplit("/", 1)[-1] not in names:
                missing.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert missing == []


def test_nothing_points_outside():
    bad = []
    for path in _sources():
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if OUTSIDE.search(line):
                bad.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    # DESIGN.md is not shipped in the repository: cite the file that holds the fact instead,
    # e.g. an op's docstring in cacheaug_engine/ops/__init__.py or reference.finite_keys.
    assert bad == [], "references outside the repository:\n" + "\n".join(bad)

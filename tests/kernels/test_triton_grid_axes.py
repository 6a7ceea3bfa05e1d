"""The Triton segment-attention kernels put B*Hkv (B*Hq for the delta kernel) on grid axis 0.

Grid axes 1 and 2 stop at 65535 programs on a GPU, axis 0 at 2^31 - 1: with the heads on axis 1
a batch of B*Hkv > 65535 failed to launch (issue 21). The interpreter does not enforce the
limit, so this records every launch's grid and checks the axis.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from cacheaug_engine import ops  # noqa: E402


def test_segment_kernels_put_heads_on_grid_axis_0(monkeypatch):
    from triton.runtime.jit import KernelInterface

    seen = []
    orig = KernelInterface.__getitem__

    def spy(self, grid):
        seen.append((getattr(getattr(self, "fn", self), "__name__", repr(self)), grid))
        return orig(self, grid)

    monkeypatch.setattr(KernelInterface, "__getitem__", spy)
    b, hq, hkv, n, s, t, dh = 3, 10, 5, 2, 5, 7, 16  # B*Hkv 15, B*Hq 30; 20 packed rows: 2 row tiles
    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    torch.manual_seed(0)
    q = torch.randn(b, hq, n * s, dh, device=dev, requires_grad=True)
    k = torch.randn(b, hkv, n * s, dh, device=dev, requires_grad=True)
    v = torch.randn(b, hkv, n * s, dh, device=dev, requires_grad=True)
    kp, vp = torch.randn(b, hkv, t, dh, device=dev), torch.randn(b, hkv, t, dh, device=dev)
    pl = torch.tensor([[0, 7]] * b, dtype=torch.int32, device=dev)
    o, lse = ops.segment_attention(q, k, v, kp, vp, pl, block_len=s, return_lse=True, backend="triton")
    (o.sum() + lse.sum()).backward()
    names = set()
    for name, grid in seen:
        if callable(grid):
            grid = grid({"BLOCK_M": 16, "BLOCK_N": 16})
        names.add(name)
        assert grid[0] in (b * hkv, b * hq), f"{name}: grid {grid} does not put B*Hkv / B*Hq on axis 0"
    assert {"_fwd_kernel", "_dq_kernel", "_dkdv_kernel", "_delta_kernel"} <= names, names

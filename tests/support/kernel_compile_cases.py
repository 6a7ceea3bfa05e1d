"""Tiny kernels for the ahead-of-time compile tests (imported by compile workers via PYTHONPATH).

A registry shaped like cacheaug_engine.triton_kernels.kernel_specs.KERNELS: a kernel that
compiles, one that is broken on purpose (tl.dot of mismatched shapes), a pipelined dot whose
oversized config needs more shared memory than sm_80 has, and one whose setup kills its worker.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from cacheaug_engine.triton_kernels.kernel_specs import KernelSpec, LaunchConfig


@triton.jit
def copy_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)


@triton.jit
def broken_kernel(X, Y, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    a = tl.load(X + offs[:, None] * 2 * BLOCK + tl.arange(0, 2 * BLOCK)[None, :])  # [BLOCK, 2 BLOCK]
    tl.store(Y + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, a))  # inner dims 2 BLOCK vs BLOCK: invalid


@triton.jit
def matmul_kernel(A, B, C, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm, rn, rk = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(A + rm[:, None] * K + (k0 + rk)[None, :])
        b = tl.load(B + (k0 + rk)[:, None] * BLOCK_N + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(C + rm[:, None] * BLOCK_N + rn[None, :], acc)


def _t(*shape, dtype=torch.float16):
    return torch.empty(shape, dtype=dtype, device="meta")


def _one(spec):
    return [dict(dtype="float16")]


def _crash(spec, meta):
    os._exit(3)  # a compiler crash stand-in: the worker process dies mid-task


KERNELS = (
    KernelSpec("copy", __name__, "copy_kernel", _one,
               lambda s: [LaunchConfig({"BLOCK": 128}, 4, 3, default=True)],
               lambda s, m: ([_t(1024), _t(1024), 1024], m)),
    KernelSpec("broken", __name__, "broken_kernel", _one,
               lambda s: [LaunchConfig({"BLOCK": 16}, 4, 3, default=True)],
               lambda s, m: ([_t(512), _t(256)], m)),
    KernelSpec("matmul", __name__, "matmul_kernel", _one,
               lambda s: [LaunchConfig({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, 4, 2, default=True),
                          LaunchConfig({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}, 4, 4)],
               lambda s, m: ([_t(128, 4096), _t(4096, 128), _t(128, 128, dtype=torch.float32), 4096], m)),
    KernelSpec("crash", __name__, "copy_kernel", _one,
               lambda s: [LaunchConfig({"BLOCK": 128}, 4, 3, default=True)], _crash),
)

"""Triton helpers shared by the kernel files of this package (one place, no copies).

* ``@triton.jit`` device helpers: ``zero_nonfinite`` / ``nonfinite_lines`` (invisible keys never leak), ``tanh``
  (softcap in segment_attention.py, segment_attention_bwd.py and decode.py) and the
  packed-row tiling / visibility helpers that the segment attention forward (segment_attention.py) and backward
  (segment_attention_bwd.py) kernels both walk.
* Host-side launch helpers of the segment attention kernels: ``common_meta`` (scalar args
  and constexprs shared by the forward and backward launches) and ``launch`` (fixed tile
  config or its autotuned twin, segment_attention_configs.py).

Kept apart from the kernel files so that no kernel file imports another (the forward
launches the backward lazily through its custom op; both import from here).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import segment_attention_configs as cfgs

# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def tanh(x):
    # tanh through exp2: exact enough in fp32 and available on every backend (interpreter too).
    e = tl.exp2(x * 2.8853900817779268)  # exp(2x)
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def zero_nonfinite(x):
    """x with NaN/Inf entries replaced by 0 (x * 0 is exactly 0 for finite x, NaN otherwise).

    Invisible keys (contract: reference.finite_keys): a tile mixes rows that see a key with rows that do
    not, and 0 x NaN = NaN inside tl.dot; operands of the probability-weighted dots go through
    this, while `scores` turns a non-finite score NaN so that a row that sees such a key (or
    is itself non-finite) still turns NaN.
    """
    return tl.where(x * 0.0 == 0.0, x, 0.0)


@triton.jit
def nonfinite_lines(x, AXIS: tl.constexpr):
    """bool vector: the line of x along AXIS holds a NaN/Inf (its sum of x * 0 is then NaN)."""
    return tl.sum(x * 0.0, axis=AXIS) != 0.0


@triton.jit
def row_tile(r_start, r_stop, PL, b, N, NS, S, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Packed rows r in [r_start, r_start + BLOCK_M): query row n, head-in-group g, block, i, p."""
    offs_r = r_start + tl.arange(0, BLOCK_M)
    row_ok = offs_r < r_stop
    n = tl.where(row_ok, offs_r // GROUP, 0)
    g = offs_r % GROUP
    blk = n // S
    i = n - blk * S
    p = tl.load(PL + b * N + blk, mask=row_ok, other=0)
    return row_ok, n, g, blk, i, p


@triton.jit
def program_row_tile(PL, NS, N, S, HKV, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's packed row tile (grid: B*Hkv x row tiles): (b, kvh, h, row_ok, n, blk, i, p).

    h [BLOCK_M] is each row's query head; the rest as in ``row_tile``.
    """
    # Heaviest tiles (latest blocks, longest prefixes when p_k ascends) start first.
    # B*Hkv on grid axis 0 (up to 2^31 - 1 programs; axes 1 and 2 stop at 65535)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // HKV
    kvh = pid_bh % HKV
    row_ok, n, g, blk, i, p = row_tile(pid_m * BLOCK_M, NS * GROUP, PL, b, N, NS, S, GROUP, BLOCK_M)
    return b, kvh, kvh * GROUP + g, row_ok, n, blk, i, p


@triton.jit
def row_key_ranges(row_ok, n, blk, p, i, NS, S, window,
                    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key ranges a row tile must visit: prefix [p_lo, p_hi), block keys [l_lo, l_hi)."""
    big = 2147483647
    p_hi = tl.max(tl.where(row_ok, p, 0), axis=0)
    n_first = tl.min(tl.where(row_ok, n, big), axis=0)
    n_last = tl.max(tl.where(row_ok, n, 0), axis=0)
    blk_first = n_first // S
    blk_last = n_last // S
    l_lo = blk_first * S
    if CAUSAL:
        l_hi = n_last + 1
    else:
        l_hi = tl.minimum((blk_last + 1) * S, NS)
    if HAS_WINDOW:
        p_lo = tl.min(tl.where(row_ok, p + i - window + 1, big), axis=0)
        p_lo = tl.maximum(p_lo, 0)
        p_lo = (p_lo // BLOCK_N) * BLOCK_N
        l_lo = tl.maximum(l_lo, n_first - window + 1)
    else:
        p_lo = p_hi * 0
    return p_lo, p_hi, l_lo, l_hi


@triton.jit
def scores(q, kT, qk_scale, softcap, HAS_SOFTCAP: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Scaled (and soft-capped) scores in base 2, plus tanh for the softcap derivative. A non-finite
    dot (a NaN/Inf in q or k) scores NaN, also through the softcap (tanh(inf) would hide it)."""
    s = tl.dot(q, kT, input_precision=INPUT_PRECISION) * qk_scale
    s = tl.where(s * 0.0 == 0.0, s, float("nan"))
    if HAS_SOFTCAP:
        t = tanh(s / softcap)
        s = softcap * t
    else:
        t = s
    return s * 1.4426950408889634, t


@triton.jit
def prefix_visible(offs_j, p, i, window, HAS_WINDOW: tl.constexpr):
    vis = offs_j[None, :] < p[:, None]
    if HAS_WINDOW:
        vis = vis & (offs_j[None, :] > (p + i)[:, None] - window)
    return vis


@triton.jit
def local_visible(offs_m, NS, S, blk, i, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    kb = offs_m // S
    ki = offs_m - kb * S
    vis = (kb[None, :] == blk[:, None]) & (offs_m[None, :] < NS)
    if CAUSAL:
        vis = vis & (ki[None, :] <= i[:, None])
    if HAS_WINDOW:
        vis = vis & (ki[None, :] > i[:, None] - window)
    return vis


# ----------------------------------------------------------------------------- launch helpers


def bucket(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


def input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def dot_f32(dtype: torch.dtype) -> bool:
    # bf16 tl.dot gives garbage in the Triton interpreter (seen with triton 3.9): compute it in fp32 there.
    return cfgs.interpreting() and dtype == torch.bfloat16


def strides(x: Tensor) -> tuple[int, ...]:
    return tuple(x.stride())


def common_meta(q: Tensor, k_prefix: Tensor, block_len: int, causal: bool, softcap, window, scale: float):
    """Scalar args and constexprs shared by the forward and backward launches."""
    b, hq, ns, dh = q.shape
    hkv, t = k_prefix.shape[1], k_prefix.shape[2]
    scalars = dict(
        NS=ns, T=t, N=ns // block_len, S=block_len, HKV=hkv, qk_scale=float(scale),
        softcap=float(softcap) if softcap is not None else 1.0,
        window=int(window) if window is not None else 0,
        NS_BUCKET=bucket(ns), T_BUCKET=bucket(t),
    )
    consts = dict(
        GROUP=hq // hkv, HEAD_DIM=dh, BLOCK_D=cfgs.block_d(dh), CAUSAL=bool(causal),
        HAS_SOFTCAP=softcap is not None, HAS_WINDOW=window is not None,
        DOT_F32=dot_f32(q.dtype), INPUT_PRECISION=input_precision(q.dtype),
    )
    return scalars, consts


def launch(kernel, tuned, name: str, grid_rows: int, grid_bh: int, args: tuple, scalars: dict, consts: dict,
           dtype: torch.dtype, head_dim: int, device: torch.device) -> None:
    """Launch `kernel` with the fixed config, or its autotuned twin `tuned`."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfgs.autotune_enabled():
        tile = "BLOCK_M" if name != "dkdv" else "BLOCK_N"
        grid = lambda meta: (grid_bh, triton.cdiv(grid_rows, meta[tile]))  # B*Hkv on axis 0 (no 65535 cap)
        tuned[grid](*args, **scalars, **consts)
        return
    bm, bn, warps, stages = cfgs.fixed_config(name, head_dim, dtype)
    rows_per_prog = bm if name != "dkdv" else bn
    grid = (grid_bh, triton.cdiv(grid_rows, rows_per_prog))
    kernel[grid](*args, **scalars, **consts, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)

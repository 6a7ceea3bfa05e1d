"""Useful work: FLOPs of visible scores only, and bytes for memory-bound ops.

Segment attention (contract: ops.segment_attention, cacheaug_engine/ops/__init__.py): row i of
block k (absolute position p_k + i) sees prefix keys j < p_k with j > p_k + i - window, and
its block's keys i' <= i (all i' if not causal) with i' > i - window. Each visible (row, key)
pair costs 2*Dh FLOPs for QK^T and 2*Dh for PV per query head. Backward is counted as 2.5x forward (five
matmuls vs two, the FlashAttention convention), so fwd+bwd = 3.5x forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

BWD_FACTOR = 2.5


def visible_pairs(prefix_lens: Tensor, block_len: int, causal: bool = True, window: int | None = None) -> int:
    """Number of visible (query row, key) pairs over all blocks and batch rows (one head)."""
    p = prefix_lens.reshape(-1, 1).to(torch.int64)  # [B*N, 1]
    s = block_len
    i = torch.arange(s, dtype=torch.int64).view(1, s)  # row inside the block
    if window is None:
        prefix_vis = p.expand(-1, s)
    else:
        lo = torch.clamp(p + i - window + 1, min=0)  # first visible prefix key
        prefix_vis = torch.clamp(p - lo, min=0)
    if causal:
        local_vis = i + 1 if window is None else torch.minimum(i + 1, torch.full_like(i, window))
    else:
        local_vis = torch.full_like(i, s) if window is None else s - torch.clamp(i - window + 1, min=0)
    return int((prefix_vis + local_vis).sum())


def segment_flops(
    prefix_lens: Tensor, block_len: int, hq: int, dh: int, *, causal: bool = True, window: int | None = None,
    backward: bool = False,
) -> float:
    fwd = 4.0 * dh * hq * visible_pairs(prefix_lens, block_len, causal, window)
    return fwd * (1.0 + BWD_FACTOR) if backward else fwd


def segment_bytes(b: int, hq: int, hkv: int, ns: int, t_used: int, dh: int, elt: int) -> float:
    """Minimum traffic of one forward: q, o, block k/v, and the prefix k/v read once."""
    return float(elt * dh * (2 * b * hq * ns + 2 * b * hkv * ns + 2 * b * hkv * t_used))


def decode_flops(lens: Tensor, hq: int, dh: int, window: int | None = None) -> float:
    n = lens.to(torch.int64)
    if window is not None:
        n = torch.clamp(n, max=window)
    return 4.0 * dh * hq * float(n.sum())


def decode_bytes(lens: Tensor, hq: int, hkv: int, dh: int, elt: int, window: int | None = None) -> float:
    """K and V of the visible keys of every request, plus q and o (lse ignored)."""
    n = lens.to(torch.int64)
    if window is not None:
        n = torch.clamp(n, max=window)
    b = lens.numel()
    return float(elt * dh * (2 * hkv * int(n.sum()) + 2 * b * hq))


def cascade_bytes(b: int, t: int, suffix_lens: Tensor, hq: int, hkv: int, dh: int, elt: int) -> float:
    """The shared prefix read once for all requests + each request's suffix + q, o."""
    return float(elt * dh * (2 * hkv * t + 2 * hkv * int(suffix_lens.to(torch.int64).sum()) + 2 * b * hq))


def cascade_flops(b: int, t: int, suffix_lens: Tensor, hq: int, dh: int) -> float:
    return 4.0 * dh * hq * float(b * t + int(suffix_lens.to(torch.int64).sum()))


def merge_bytes(rows: int, dh: int, elt: int) -> float:
    """Read o_a, o_b (elt) and lse_a, lse_b (fp32); write o (elt) and lse (fp32)."""
    return float(rows * (3 * dh * elt + 3 * 4))

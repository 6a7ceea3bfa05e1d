"""The `flex` backend: segment attention through FlexAttention with an equivalent BlockMask.

Keys are [k_prefix ; k] concatenated along the sequence (T + N*S); the block mask lets
FlexAttention skip fully invisible tiles. It serves as a peer in benchmarks and as a
fallback on GPUs without Triton. On CUDA the kernel is compiled once per process; on the
CPU it runs eagerly (forward only: FlexAttention has no CPU backward).

Invisible keys (contract: reference.finite_keys): FlexAttention multiplies masked probabilities (0) by
the values of partially visible tiles, so a NaN a row cannot see would still reach it
(0 x NaN). Keys and values therefore pass through reference.finite_keys, and score_mod
scores a key that held a non-finite value NaN: exactly the rows that see it turn NaN.
"""

from __future__ import annotations

import math
import warnings
from functools import cache

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import AuxRequest

from cacheaug_engine.ops.backends import BackendUnavailableError
from cacheaug_engine.ops.reference import finite_keys, lse_dtype


@cache
def _flex_fn(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cuda":
        return torch.compile(flex_attention, dynamic=False)

    def eager(*args, **kwargs):
        # Eager flex warns that it materialises scores; on the CPU that is the intended path.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex_attention(*args, **kwargs)

    return eager


def segment_mask_mod(prefix_lens: Tensor, t: int, block_len: int, causal: bool, window: int | None):
    """mask_mod over [T prefix keys ; N*S block keys] for queries [N*S]."""
    s = block_len

    def mask_mod(b, h, q_idx, kv_idx):
        blk = q_idx // s
        row = q_idx % s
        p = prefix_lens[b, blk]
        in_prefix = kv_idx < t
        local = kv_idx - t
        same_block = (local // s) == blk
        local_ok = same_block & ((local % s) <= row) if causal else same_block
        key_pos = torch.where(in_prefix, kv_idx, p + (local % s))
        visible = torch.where(in_prefix, kv_idx < p, local_ok)
        if window is not None:
            visible = visible & (key_pos > p + row - window)
        return visible

    return mask_mod


def build_block_mask(prefix_lens: Tensor, t: int, ns: int, block_len: int, causal: bool, window: int | None):
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = segment_mask_mod(prefix_lens.long(), t, block_len, causal, window)
    b = prefix_lens.shape[0]
    return create_block_mask(mask_mod, b, None, ns, t + ns, device=str(prefix_lens.device))


def segment_attention(
    q: Tensor, k: Tensor, v: Tensor, k_prefix: Tensor, v_prefix: Tensor, prefix_lens: Tensor,
    *, block_len: int, causal: bool = True, softcap: float | None = None, window: int | None = None,
    scale: float | None = None, return_lse: bool = False, block_mask=None,
) -> Tensor | tuple[Tensor, Tensor]:
    t, ns, dh = k_prefix.shape[2], q.shape[2], q.shape[3]
    if q.device.type != "cuda" and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise BackendUnavailableError(
            "backend='flex' on the CPU is forward-only (FlexAttention has no CPU backward); "
            "use backend='torch' for training on the CPU"
        )
    if block_mask is None:
        block_mask = build_block_mask(prefix_lens, t, ns, block_len, causal, window)
    k_cat, v_cat, bad = finite_keys(torch.cat([k_prefix, k], dim=2), torch.cat([v_prefix, v], dim=2))
    cap = None if softcap is None else float(softcap)
    group = q.shape[1] // k.shape[1]

    def score_mod(score, b, h, q_idx, kv_idx):
        if cap is not None:
            score = cap * torch.tanh(score / cap)
        return torch.where(bad[b, h // group, kv_idx], float("nan"), score)

    scale = 1.0 / math.sqrt(dh) if scale is None else scale
    out, aux = _flex_fn(q.device.type)(
        q, k_cat, v_cat, score_mod=score_mod, block_mask=block_mask, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1], return_aux=AuxRequest(lse=True),
    )
    lse = aux.lse
    if return_lse:
        return out, lse.to(lse_dtype(q.dtype))
    return out

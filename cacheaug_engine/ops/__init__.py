"""Public ops: validation, backend dispatch, then one implementation per backend.

    segment_attention  - training / latent prefill
    decode_attention   - one-token decode over per-request caches
    cascade_decode     - decode over one shared prefix + per-request suffixes
    merge_states       - exact log-sum-exp merge of two partial attentions

Backends live in one place each: torch_impl.py (CPU path), flex_impl.py,
cacheaug_engine.triton_kernels.{segment_attention,decode} and cacheaug_engine.ops.cuda.launch.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

from cacheaug_engine.ops.backends import resolve_backend

from . import validate
from .plan import DecodePlan, SegmentPlan, impl, plan_decode, plan_segment_attention


def _backward(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def segment_attention(
    q: Tensor, k: Tensor, v: Tensor, k_prefix: Tensor, v_prefix: Tensor, prefix_lens: Tensor,
    *, block_len: int, causal: bool = True, softcap: float | None = None, window: int | None = None,
    scale: float | None = None, return_lse: bool = False, backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of N blocks of S query rows, each over its own prefix of a frozen cache.

    Args:
        q: [B, Hq, N*S, Dh] queries of the N blocks, block k at rows [k*S, (k+1)*S).
        k, v: [B, Hkv, N*S, Dh] the blocks' own keys/values (Hq % Hkv == 0).
        k_prefix, v_prefix: [B, Hkv, T, Dh] the frozen cache (no gradient is computed
            for it by the fused kernels).
        prefix_lens: int32/int64 [B, N], p_k in [0, T]: block k sees prefix keys j < p_k.
        block_len: S. Row i of block k sits at absolute position p_k + i.
        causal: row i sees its block's keys i' <= i (all S keys if False); a bool (TypeError otherwise).
        softcap: c, scores become c * tanh(s / c) before masking (Gemma-2: 50).
        window: keep only keys at absolute position > p_k + i - window.
        scale: score scale, default 1/sqrt(Dh).
        return_lse: also return the natural-log log-sum-exp, fp32 [B, Hq, N*S].
        backend: "torch" | "flex" | "triton"; default CACHEAUG_BACKEND, then the best
            available for q's device.

    dtypes: float32, float16, bfloat16 (float32 accumulation); float64 on the torch backend.
    Returns o with q's shape and dtype (and lse); an empty batch (B = 0) gives empty o and lse.
    A key a row cannot see never influences that row's o, lse or gradients, whatever its memory
    holds; a key whose k or v holds NaN/Inf makes the rows that see it NaN (every backend;
    contract in reference.finite_keys).
    """
    validate.check_segment_inputs(
        q, k, v, k_prefix, v_prefix, prefix_lens, block_len, softcap, window, scale, values=False
    )
    plan = plan_segment_attention(
        prefix_lens, block_len=block_len, prefix_len=k_prefix.shape[2], head_dim=q.shape[3], dtype=q.dtype,
        causal=causal, softcap=softcap, window=window, scale=scale, return_lse=return_lse,
        backward=_backward(q, k, v, k_prefix, v_prefix), backend=backend,
    )
    return plan.run(q, k, v, k_prefix, v_prefix)


def decode_attention(
    q: Tensor, k: Tensor, v: Tensor, lens: Tensor, *, softcap: float | None = None,
    window: int | None = None, scale: float | None = None, return_lse: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """One decode step for B requests over their own caches.

    Args:
        q: [B, Hq, Dh] the new token's queries (its key/value already written at lens-1).
        k, v: [B, Hkv, Tmax, Dh] caches (any strides); request b uses keys [0, lens[b]).
        lens: int32/int64 [B] in [0, Tmax]; 0 gives o = 0 and lse = -inf.
        softcap, window, scale: as in segment_attention; the query sits at lens[b] - 1.
        return_lse: also return lse, fp32 [B, Hq].
        backend: "torch" | "triton" | "cuda".

    dtypes: float32, float16, bfloat16. Returns o [B, Hq, Dh] in q's dtype (and lse).
    """
    validate.check_decode_inputs(q, k, v, lens, softcap, window, scale, values=False)
    plan = plan_decode(
        lens, kv_capacity=k.shape[2], num_q_heads=q.shape[1], num_kv_heads=k.shape[1], head_dim=q.shape[2],
        dtype=q.dtype, softcap=softcap, window=window, scale=scale, return_lse=return_lse, backend=backend,
    )
    return plan.run(q, k, v)


def cascade_decode(
    q: Tensor, k_shared: Tensor, v_shared: Tensor, k_suffix: Tensor, v_suffix: Tensor,
    suffix_lens: Tensor, *, softcap: float | None = None, window: int | None = None,
    scale: float | None = None, return_lse: bool = False, backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Decode B requests that share one prompt cache, each with its own suffix.

    Args:
        q: [B, Hq, Dh].
        k_shared, v_shared: [Hkv, T, Dh], read once per step for all requests.
        k_suffix, v_suffix: [B, Hkv, L, Dh] per-request latents + generated tokens.
        suffix_lens: int32/int64 [B] in [0, L]; request b sees all T shared keys and its
            first suffix_lens[b] suffix keys; its query sits at T + suffix_lens[b] - 1.
        softcap, window, scale, return_lse, backend: as in decode_attention.

    Returns o [B, Hq, Dh] in q's dtype (and lse fp32 [B, Hq]).
    """
    validate.check_cascade_inputs(
        q, k_shared, v_shared, k_suffix, v_suffix, suffix_lens, softcap, window, scale, values=False
    )
    plan = plan_decode(
        suffix_lens, kv_capacity=k_suffix.shape[2], num_q_heads=q.shape[1], num_kv_heads=k_shared.shape[0],
        head_dim=q.shape[2], dtype=q.dtype, softcap=softcap, window=window, scale=scale, return_lse=return_lse,
        backend=backend, shared_len=k_shared.shape[1],
    )
    return plan.run_cascade(q, k_shared, v_shared, k_suffix, v_suffix)


def merge_states(
    o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor, *, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """Exact merge of two attention states over disjoint key sets.

    Args:
        o_a, o_b: [..., Dh] partial outputs (float32/16, bfloat16).
        lse_a, lse_b: fp32 [...] their natural-log log-sum-exps (-inf = empty part).

    Returns (o [..., Dh] in o_a's dtype, lse fp32 [...]) = attention over the union. An empty
    part contributes nothing whatever its o holds; a NaN lse gives NaN o and lse, never the
    o = 0 of an empty state; a +inf lse (an overflowed state: its weight inf / inf is undefined)
    gives NaN o and lse +inf (= logaddexp of the two), as ``reference.merge_states``.
    """
    validate.check_merge_inputs(o_a, lse_a, o_b, lse_b)
    name = resolve_backend("merge_states", backend, o_a.device, dtype=o_a.dtype, head_dim=o_a.shape[-1])
    return cast(tuple[Tensor, Tensor], impl("merge_states", name)(o_a, lse_a, o_b, lse_b))


__all__ = [
    "segment_attention", "decode_attention", "cascade_decode", "merge_states", "plan_segment_attention",
    "plan_decode", "SegmentPlan", "DecodePlan",
]

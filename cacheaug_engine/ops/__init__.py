"""Public ops: validation, backend dispatch, then one implementation per backend.

    segment_attention  - training / latent prefill
    decode_attention   - one-token decode over per-request caches
    cascade_decode     - decode over one shared prefix + per-request suffixes
    merge_states       - exact log-sum-exp merge of two partial attentions

Backends live in one place each: torch_impl.py (CPU path), flex_impl.py,
cacheaug_engine.triton_kernels.{segment_attention,decode} and cacheaug_engine.cuda_ops.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import Tensor

from .. import reference
from ..backends import resolve_backend
from . import torch_impl, validate

_IMPL_MODULES = {
    ("segment_attention", "torch"): "cacheaug_engine.ops.torch_impl",
    ("segment_attention", "flex"): "cacheaug_engine.ops.flex_impl",
    ("segment_attention", "triton"): "cacheaug_engine.triton_kernels.segment_attention",
    ("decode_attention", "torch"): "cacheaug_engine.ops.torch_impl",
    ("decode_attention", "triton"): "cacheaug_engine.triton_kernels.decode",
    ("decode_attention", "cuda"): "cacheaug_engine.cuda_ops",
    ("cascade_decode", "torch"): "cacheaug_engine.ops.torch_impl",
    ("cascade_decode", "triton"): "cacheaug_engine.triton_kernels.decode",
    ("cascade_decode", "cuda"): "cacheaug_engine.cuda_ops",
    ("merge_states", "torch"): "cacheaug_engine.reference",
    ("merge_states", "triton"): "cacheaug_engine.triton_kernels.decode",
    ("merge_states", "cuda"): "cacheaug_engine.cuda_ops",
}


# Implementations resolved so far. The torch ones are bound at import so that a
# torch.compile(fullgraph=True) trace through the torch backend never meets an import.
_IMPLS: dict[tuple[str, str], Callable] = {
    (op, "torch"): getattr(torch_impl if op != "merge_states" else reference, op)
    for op in ("segment_attention", "decode_attention", "cascade_decode", "merge_states")
}


def _impl(op: str, backend: str) -> Callable:
    fn = _IMPLS.get((op, backend))
    if fn is None:
        fn = _IMPLS[(op, backend)] = getattr(importlib.import_module(_IMPL_MODULES[(op, backend)]), op)
    return fn


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
        causal: row i sees its block's keys i' <= i (all S keys if False).
        softcap: c, scores become c * tanh(s / c) before masking (Gemma-2: 50).
        window: keep only keys at absolute position > p_k + i - window.
        scale: score scale, default 1/sqrt(Dh).
        return_lse: also return the natural-log log-sum-exp, fp32 [B, Hq, N*S].
        backend: "torch" | "flex" | "triton"; default CACHEAUG_BACKEND, then the best
            available for q's device.

    dtypes: float32, float16, bfloat16 (float32 accumulation); float64 on the torch backend.
    Returns o with q's shape and dtype (and lse).
    """
    validate.check_segment_inputs(q, k, v, k_prefix, v_prefix, prefix_lens, block_len, softcap, window, scale)
    name = resolve_backend("segment_attention", backend, q.device)
    return _impl("segment_attention", name)(
        q, k, v, k_prefix, v_prefix, prefix_lens, block_len=block_len, causal=causal,
        softcap=softcap, window=window, scale=scale, return_lse=return_lse,
    )


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
    validate.check_decode_inputs(q, k, v, lens, softcap, window, scale)
    name = resolve_backend("decode_attention", backend, q.device)
    return _impl("decode_attention", name)(
        q, k, v, lens, softcap=softcap, window=window, scale=scale, return_lse=return_lse
    )


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
    validate.check_cascade_inputs(q, k_shared, v_shared, k_suffix, v_suffix, suffix_lens, softcap, window, scale)
    name = resolve_backend("cascade_decode", backend, q.device)
    return _impl("cascade_decode", name)(
        q, k_shared, v_shared, k_suffix, v_suffix, suffix_lens, softcap=softcap, window=window,
        scale=scale, return_lse=return_lse,
    )


def merge_states(
    o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor, *, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """Exact merge of two attention states over disjoint key sets.

    Args:
        o_a, o_b: [..., Dh] partial outputs (float32/16, bfloat16).
        lse_a, lse_b: fp32 [...] their natural-log log-sum-exps (-inf = empty part).

    Returns (o [..., Dh] in o_a's dtype, lse fp32 [...]) = attention over the union.
    """
    validate.check_merge_inputs(o_a, lse_a, o_b, lse_b)
    name = resolve_backend("merge_states", backend, o_a.device)
    return _impl("merge_states", name)(o_a, lse_a, o_b, lse_b)


__all__ = ["segment_attention", "decode_attention", "cascade_decode", "merge_states"]

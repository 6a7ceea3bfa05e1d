"""Host-side helpers of the decode kernels that need neither torch nor triton (shared with the
kernels' own wrappers; the kernels package imports nothing from the framework above it)."""

from __future__ import annotations

import math


def default_scale(scale: float | None, dh: int) -> float:
    """The softmax scale: ``scale`` if given, else 1 / sqrt(Dh)."""
    return 1.0 / math.sqrt(dh) if scale is None else float(scale)


def public_decode_ops(decode_impl, cascade_impl):
    """decode_attention and cascade_decode with the public signature (``return_lse``) over a
    backend's implementations, which take the options as keywords and return (o, lse)."""

    def decode_attention(q, k, v, lens, *, softcap=None, window=None, scale=None, return_lse=False):
        o, lse = decode_impl(q, k, v, lens, softcap=softcap, window=window, scale=scale)
        return (o, lse) if return_lse else o

    def cascade_decode(
        q, k_shared, v_shared, k_suffix, v_suffix, suffix_lens, *, softcap=None, window=None, scale=None,
        return_lse=False,
    ):
        o, lse = cascade_impl(
            q, k_shared, v_shared, k_suffix, v_suffix, suffix_lens, softcap=softcap, window=window, scale=scale
        )
        return (o, lse) if return_lse else o

    return decode_attention, cascade_decode

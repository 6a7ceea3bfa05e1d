"""Host-side pieces the decode backends share: cuda_ops, interop and triton_kernels.decode.

No torch here: interop describes its arrays without torch, so these helpers take plain
values (pointers, element strides, sizes) and callables.
"""

from __future__ import annotations

import math

FLOAT_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}  # the C API's dtype codes (_C.FLOAT32, ...)


def default_scale(scale: float | None, dh: int) -> float:
    return 1.0 / math.sqrt(dh) if scale is None else float(scale)


def c_decode_args(dtype_code, sizes, inputs, lens, out, lse, *, scale, softcap, window, workspace, stream) -> list:
    """Positional arguments of ``_C.decode_attention`` / ``_C.cascade_decode``.

    sizes: (B, Hq, Hkv, Tmax, Dh) for decode, (B, Hq, Hkv, T, L, Dh) for cascade.
    inputs: (pointer, element strides) of q, k, v - or of q, k_shared, v_shared, k_suffix, v_suffix.
    lens: (pointer, is int64, stride); out, lse: (pointer, element strides);
    workspace: (pointer, bytes); stream: a cudaStream_t as an int. num_splits is 0 (the
    library's heuristic).
    """
    args = [dtype_code, *sizes]
    for ptr, strides in inputs:
        args += [ptr, list(strides)]
    args += [*lens, out[0], list(out[1]), lse[0], list(lse[1])]
    args += [default_scale(scale, sizes[-1]), float(softcap or 0.0), int(window or 0), 0, *workspace, stream]
    return args


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

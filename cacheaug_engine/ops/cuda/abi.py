"""The CUDA C API's argument layout, shared by the torch launcher (``launch``) and ``interop``.

No torch here: interop describes its arrays without torch, so these helpers take plain
values (pointers, element strides, sizes).
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



"""The CUDA decode ops on any GPU array: CuPy, or anything with ``__cuda_array_interface__``
or DLPack (``__dlpack__``). No torch on this path: arrays are described by (pointer, shape,
element strides, dtype) and handed to cacheaug_engine._C directly.

    from cacheaug_engine.ops.cuda import interop
    o, lse = interop.decode_attention(q, k, v, lens)            # CuPy arrays in, CuPy out

Outputs (and the split-KV workspace) are allocated with CuPy when it is installed (or with
torch for torch tensors); for other producers pass ``out=``, ``lse_out=`` and, when the op
needs one, ``workspace=`` (a byte buffer of at least ``*_workspace_bytes(...)`` bytes).
Shapes, dtypes and semantics are those of the public ops (see cacheaug_engine.ops). Length
values are not range-checked here (that would read them back to the host): keep lens in
[0, Tmax] and suffix_lens in [0, L]. ``stream`` is a cudaStream_t as an int (default: CuPy's
current stream for CuPy inputs, else the legacy default stream 0).
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

from cacheaug_engine.ops.cuda.abi import FLOAT_CODES as _FLOAT_CODES
from cacheaug_engine.ops.cuda.abi import c_decode_args

# DLPack dtype codes: 0 int, 1 uint, 2 float, 4 bfloat
_TYPESTR = {"<f4": "float32", "<f2": "float16", "<i4": "int32", "<i8": "int64"}
_DLPACK = {(2, 32): "float32", (2, 16): "float16", (4, 16): "bfloat16", (0, 32): "int32", (0, 64): "int64"}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "int64": 8}
_KDLCUDA = 2


@dataclass
class Array:
    """A device array as the kernels see it."""

    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # elements
    dtype: str
    keepalive: object = None


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def _from_dlpack(obj, name: str, require_cuda: bool = True) -> Array:
    capsule = obj.__dlpack__()
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    addr = get(capsule, b"dltensor")  # DLManagedTensor starts with its DLTensor
    t = _DLTensor.from_address(addr)
    if require_cuda and t.device.device_type != _KDLCUDA:
        raise ValueError(f"{name}: expected a CUDA array, DLPack device type is {t.device.device_type}")
    key = (t.dtype.code, t.dtype.bits)
    if key not in _DLPACK or t.dtype.lanes != 1:
        raise TypeError(f"{name}: unsupported DLPack dtype code={t.dtype.code} bits={t.dtype.bits}")
    shape = tuple(t.shape[i] for i in range(t.ndim))
    strides = tuple(t.strides[i] for i in range(t.ndim)) if t.strides else _contiguous_strides(shape)
    dtype = _DLPACK[key]
    # the capsule stays unconsumed: its destructor releases the producer's reference
    return Array(t.data + t.byte_offset, shape, strides, dtype, keepalive=(capsule, obj))


def as_array(obj, name: str = "array", *, require_cuda: bool = True) -> Array:
    """Describe ``obj`` (CuPy / __cuda_array_interface__ / DLPack / torch CUDA tensor).

    require_cuda=False also accepts host DLPack arrays (used to test the parsing on CPUs)."""
    if isinstance(obj, Array):
        return obj
    try:
        cai = obj.__cuda_array_interface__
    except (AttributeError, TypeError, RuntimeError, ValueError):  # e.g. torch bfloat16 / CPU tensors
        cai = None
    if cai is not None and cai.get("typestr") in _TYPESTR:
        dtype = _TYPESTR[cai["typestr"]]
        shape = tuple(cai["shape"])
        if cai.get("strides") is None:
            strides = _contiguous_strides(shape)
        else:
            item = _ITEMSIZE[dtype]
            if any(s % item for s in cai["strides"]):
                raise ValueError(f"{name}: byte strides {cai['strides']} are not multiples of the item size")
            strides = tuple(s // item for s in cai["strides"])
        return Array(int(cai["data"][0]), shape, strides, dtype, keepalive=obj)
    if hasattr(obj, "__dlpack__"):  # e.g. bfloat16, which __cuda_array_interface__ cannot describe
        return _from_dlpack(obj, name, require_cuda)
    raise TypeError(
        f"{name}: expected a CUDA array (CuPy, __cuda_array_interface__ or DLPack), got {type(obj).__name__}"
    )


def _ext():
    from cacheaug_engine import _C

    return _C


def _module_of(obj) -> str:
    return type(obj).__module__.split(".")[0]


def _empty(like, shape: tuple[int, ...], dtype: str):
    mod = _module_of(like)
    if mod == "cupy":
        import cupy

        if dtype == "bfloat16":
            raise TypeError("CuPy has no bfloat16 arrays: pass out= (e.g. a torch or DLPack bfloat16 buffer)")
        return cupy.empty(shape, dtype=dtype)
    if mod == "torch":
        import torch

        return torch.empty(shape, dtype=getattr(torch, dtype), device=like.device)
    raise TypeError(f"cannot allocate outputs for {type(like).__name__}: pass out=, lse_out= and workspace=")


def _default_stream(like, stream: int | None) -> int:
    if stream is not None:
        return int(stream)
    if _module_of(like) == "cupy":
        import cupy

        return cupy.cuda.get_current_stream().ptr
    if _module_of(like) == "torch":
        import torch

        return torch.cuda.current_stream(like.device).cuda_stream
    return 0


def _float_group(names, arrays):
    first = arrays[0]
    if first.dtype not in _FLOAT_CODES:
        raise TypeError(f"{names[0]}: expected float32, float16 or bfloat16, got {first.dtype}")
    for n, a in zip(names[1:], arrays[1:], strict=True):
        if a.dtype != first.dtype:
            raise TypeError(f"{n}: expected dtype {first.dtype} (same as {names[0]}), got {a.dtype}")


def _ndim(name, a: Array, nd: int, layout: str):
    if len(a.shape) != nd:
        raise ValueError(f"{name}: expected a {nd}-D array {layout}, got shape {a.shape}")


def _lens(name, a: Array, b: int):
    if a.dtype not in ("int32", "int64") or a.shape != (b,):
        raise ValueError(f"{name}: expected an int32/int64 array of shape ({b},), got {a.dtype} {a.shape}")


def _outputs(like, shape, dtype, out, lse_out):
    o = out if out is not None else _empty(like, shape, dtype)
    lse = lse_out if lse_out is not None else _empty(like, shape[:-1], "float32")
    oa, la = as_array(o, "out"), as_array(lse, "lse_out")
    if oa.shape != shape or oa.dtype != dtype or la.shape != shape[:-1] or la.dtype != "float32":
        raise ValueError(
            f"out/lse_out: expected {dtype}{shape} and float32{shape[:-1]}, got {oa.dtype}{oa.shape}, "
            f"{la.dtype}{la.shape}"
        )
    return o, lse, oa, la


def _ws(like, nbytes: int, workspace):
    if nbytes == 0:
        return 0, None
    buf = workspace if workspace is not None else _empty(like, ((nbytes + 3) // 4,), "float32")
    wa = as_array(buf, "workspace")
    if math.prod(wa.shape) * _ITEMSIZE[wa.dtype] < nbytes:
        raise ValueError(f"workspace: need {nbytes} bytes")
    return wa.ptr, buf


def _launch(launcher, workspace_query, like, A: list[Array], sizes, out, lse_out, workspace, stream, **opts):
    """Outputs, workspace, then the _C launcher: A = the float inputs (q first) + the lengths array;
    sizes = the launcher's sizes (B, Hq, ..., Dh), which are also workspace_query's first arguments."""
    *inputs, lens = A
    o, lse, oa, la = _outputs(like, (sizes[0], sizes[1], sizes[-1]), A[0].dtype, out, lse_out)
    nbytes = workspace_query(*sizes, 0)[-1]
    ws_ptr, _keep = _ws(like, nbytes, workspace)
    launcher(
        *c_decode_args(
            _FLOAT_CODES[A[0].dtype], sizes, [(a.ptr, a.strides) for a in inputs],
            (lens.ptr, lens.dtype == "int64", lens.strides[0]), (oa.ptr, oa.strides), (la.ptr, la.strides),
            workspace=(ws_ptr, nbytes), stream=_default_stream(like, stream), **opts,
        )
    )
    return o, lse


def decode_attention(
    q,
    k,
    v,
    lens,
    *,
    softcap=None,
    window=None,
    scale=None,
    out=None,
    lse_out=None,
    workspace=None,
    stream=None,
):
    """q [B,Hq,Dh], k/v [B,Hkv,Tmax,Dh], lens [B] -> (o [B,Hq,Dh], lse fp32 [B,Hq])."""
    A = [as_array(x, n) for x, n in ((q, "q"), (k, "k"), (v, "v"), (lens, "lens"))]
    _ndim("q", A[0], 3, "[B, Hq, Dh]")
    _ndim("k", A[1], 4, "[B, Hkv, Tmax, Dh]")
    _ndim("v", A[2], 4, "[B, Hkv, Tmax, Dh]")
    _float_group(["q", "k", "v"], A[:3])
    b, hq, dh = A[0].shape
    _, hkv, tmax, _ = A[1].shape
    if A[2].shape != A[1].shape or A[1].shape[0] != b or A[1].shape[3] != dh or hq % hkv:
        raise ValueError(
            f"k/v: expected [B={b}, Hkv | Hq={hq}, Tmax, Dh={dh}], got {A[1].shape}, {A[2].shape}"
        )
    _lens("lens", A[3], b)
    C = _ext()
    return _launch(C.decode_attention, C.decode_workspace, q, A, (b, hq, hkv, tmax, dh), out, lse_out, workspace,
                   stream, scale=scale, softcap=softcap, window=window)


def cascade_decode(
    q,
    k_shared,
    v_shared,
    k_suffix,
    v_suffix,
    suffix_lens,
    *,
    softcap=None,
    window=None,
    scale=None,
    out=None,
    lse_out=None,
    workspace=None,
    stream=None,
):
    """q [B,Hq,Dh], shared [Hkv,T,Dh], suffix [B,Hkv,L,Dh], suffix_lens [B] -> (o, lse)."""
    names = ("q", "k_shared", "v_shared", "k_suffix", "v_suffix", "suffix_lens")
    A = [
        as_array(x, n)
        for x, n in zip((q, k_shared, v_shared, k_suffix, v_suffix, suffix_lens), names, strict=True)
    ]
    for i, (nd, lay) in enumerate(
        (
            (3, "[B, Hq, Dh]"),
            (3, "[Hkv, T, Dh]"),
            (3, "[Hkv, T, Dh]"),
            (4, "[B, Hkv, L, Dh]"),
            (4, "[B, Hkv, L, Dh]"),
        )
    ):
        _ndim(names[i], A[i], nd, lay)
    _float_group(list(names[:5]), A[:5])
    b, hq, dh = A[0].shape
    hkv, t, _ = A[1].shape
    length = A[3].shape[2]
    if (
        A[2].shape != A[1].shape
        or A[1].shape[2] != dh
        or hq % hkv
        or A[3].shape != (b, hkv, length, dh)
        or A[4].shape != A[3].shape
    ):
        raise ValueError(f"shapes do not match q {A[0].shape}: shared {A[1].shape}, suffix {A[3].shape}")
    _lens("suffix_lens", A[5], b)
    C = _ext()
    return _launch(C.cascade_decode, C.cascade_workspace, q, A, (b, hq, hkv, t, length, dh), out, lse_out,
                   workspace, stream, scale=scale, softcap=softcap, window=window)


def merge_states(o_a, lse_a, o_b, lse_b, *, out=None, lse_out=None, stream=None):
    """o_* [R, Dh] (2-D; reshape leading dims first), lse_* fp32 [R] -> (o, lse)."""
    A = [as_array(x, n) for x, n in ((o_a, "o_a"), (lse_a, "lse_a"), (o_b, "o_b"), (lse_b, "lse_b"))]
    _ndim("o_a", A[0], 2, "[R, Dh]")
    _float_group(["o_a", "o_b"], [A[0], A[2]])
    if A[2].shape != A[0].shape:
        raise ValueError(f"o_b: expected shape {A[0].shape}, got {A[2].shape}")
    n, dh = A[0].shape
    for name, la in (("lse_a", A[1]), ("lse_b", A[3])):
        if la.shape != (n,) or la.dtype != "float32":
            raise ValueError(f"{name}: expected float32 ({n},), got {la.dtype} {la.shape}")
    o, lse, oa, la = _outputs(o_a, (n, dh), A[0].dtype, out, lse_out)
    _ext().merge_states(
        _FLOAT_CODES[A[0].dtype], n, dh, A[0].ptr, *A[0].strides, A[1].ptr, *A[1].strides, A[2].ptr,
        *A[2].strides, A[3].ptr, *A[3].strides, oa.ptr, *oa.strides, la.ptr, *la.strides, _default_stream(o_a, stream),
    )
    return o, lse


def decode_workspace_bytes(b: int, hq: int, hkv: int, tmax: int, dh: int) -> int:
    return _ext().decode_workspace(b, hq, hkv, tmax, dh, 0)[1]


def cascade_workspace_bytes(b: int, hq: int, hkv: int, t: int, length: int, dh: int) -> int:
    return _ext().cascade_workspace(b, hq, hkv, t, length, dh, 0)[2]


__all__ = [
    "as_array",
    "Array",
    "decode_attention",
    "cascade_decode",
    "merge_states",
    "decode_workspace_bytes",
    "cascade_workspace_bytes",
]

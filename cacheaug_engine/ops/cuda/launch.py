"""The `cuda` backend of the decode ops: the CUDA C++ kernels of csrc/ through cacheaug_engine._C.

Each op is a ``torch.library.custom_op`` (with a fake implementation, so it traces under
torch.compile) whose eager body passes raw pointers, element strides and the current
stream to the pybind11 module. Inputs are used with their own strides (no copies);
outputs are fresh contiguous tensors. The cuda kernels support float32/float16/bfloat16
and head dims 64, 128 and 256; other head dims raise (use backend="triton" or "torch").
Nothing touches CUDA at import time; the extension is imported on first use.
"""

import torch
from torch import Tensor

from cacheaug_engine.ops.backends import BackendUnavailableError
from cacheaug_engine.ops.cuda.abi import FLOAT_CODES, c_decode_args

_DTYPES = {getattr(torch, name): code for name, code in FLOAT_CODES.items()}
HEAD_DIMS = (64, 128, 256)


def _ext():
    try:
        from cacheaug_engine import _C
    except ImportError as exc:  # pragma: no cover - depends on the build
        raise BackendUnavailableError(
            "the CUDA extension cacheaug_engine._C is not built "
            "(reinstall with CACHEAUG_BUILD_CUDA=1 and nvcc "
            f"present): {exc}"
        ) from exc
    return _C


def _check(q: Tensor, what: str) -> None:
    if q.dtype not in _DTYPES:
        raise TypeError(f"{what}: the cuda backend supports float32, float16 and bfloat16, got {q.dtype}")
    if q.device.type != "cuda":
        raise ValueError(f"{what}: the cuda backend needs CUDA tensors, got {q.device}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(
            f"{what}: the cuda backend supports head dims {HEAD_DIMS}, got {q.shape[-1]} "
            "(backend='triton' or 'torch' take any head dim)"
        )


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def workspace(
    b: int, hq: int, hkv: int, dh: int, kv_capacity: int, shared_len: int | None, device: torch.device
) -> Tensor:
    """The split-KV workspace (uint8) for decode steps of up to ``kv_capacity`` keys (cascade: suffix
    keys, with ``shared_len`` shared keys), sized once by ops.plan_decode. The split count only grows
    with the key count, so a run over fewer keys fits too (the launcher checks the size)."""
    C = _ext()
    with torch.cuda.device(device):
        if shared_len is None:
            nbytes = C.decode_workspace(b, hq, hkv, kv_capacity, dh, 0)[-1]
        else:
            nbytes = C.cascade_workspace(b, hq, hkv, shared_len, kv_capacity, dh, 0)[-1]
    return torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=device)


def _ptr_strides(*tensors: Tensor) -> list[tuple[int, list[int]]]:
    return [(t.data_ptr(), list(t.stride())) for t in tensors]


def _launch(launcher: str, workspace_query: str, q: Tensor, sizes: tuple[int, ...], kv: tuple[Tensor, ...],
            lens: Tensor, softcap: float | None, window: int | None, scale: float | None,
            ws: Tensor | None) -> tuple[Tensor, Tensor]:
    """Allocate o [B,Hq,Dh] and lse, call _C.<launcher>; sizes are the launcher's (B, Hq, ..., Dh),
    which are also _C.<workspace_query>'s first arguments. ``ws``: a planned workspace
    (ops.plan_decode); without one it is sized and allocated here, for this call."""
    b, hq, dh = q.shape
    o = torch.empty((b, hq, dh), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq), dtype=torch.float32, device=q.device)
    if b * hq == 0:
        return o, lse
    C = _ext()
    with torch.cuda.device(q.device):
        if ws is None:
            nbytes = getattr(C, workspace_query)(*sizes, 0)[-1]
            ws = torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=q.device)
        ws_ptr, nbytes = ws.data_ptr(), ws.numel()
        getattr(C, launcher)(
            *c_decode_args(
                _DTYPES[q.dtype], sizes, _ptr_strides(q, *kv),
                (lens.data_ptr(), lens.dtype == torch.int64, lens.stride(0)), *_ptr_strides(o, lse),
                scale=scale, softcap=softcap, window=window, workspace=(ws_ptr, nbytes), stream=_stream(q.device),
            )
        )
    return o, lse


@torch.library.custom_op("cacheaug_cuda::decode_attention", mutates_args=())
def _decode_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lens: Tensor,
    softcap: float | None,
    window: int | None,
    scale: float | None,
    workspace: Tensor | None,
) -> tuple[Tensor, Tensor]:
    _check(q, "decode_attention")
    sizes = (q.shape[0], q.shape[1], k.shape[1], k.shape[2], q.shape[2])  # B, Hq, Hkv, Tmax, Dh
    return _launch("decode_attention", "decode_workspace", q, sizes, (k, v), lens, softcap, window, scale, workspace)


@_decode_op.register_fake
def _(q, k, v, lens, softcap, window, scale, workspace):
    b, hq, dh = q.shape
    return q.new_empty((b, hq, dh)), q.new_empty((b, hq), dtype=torch.float32)


@torch.library.custom_op("cacheaug_cuda::cascade_decode", mutates_args=())
def _cascade_op(
    q: Tensor,
    k_shared: Tensor,
    v_shared: Tensor,
    k_suffix: Tensor,
    v_suffix: Tensor,
    suffix_lens: Tensor,
    softcap: float | None,
    window: int | None,
    scale: float | None,
    workspace: Tensor | None,
) -> tuple[Tensor, Tensor]:
    _check(q, "cascade_decode")
    b, hq, dh = q.shape
    sizes = (b, hq, k_shared.shape[0], k_shared.shape[1], k_suffix.shape[2], dh)  # B, Hq, Hkv, T, L, Dh
    inputs = (k_shared, v_shared, k_suffix, v_suffix)
    return _launch(
        "cascade_decode", "cascade_workspace", q, sizes, inputs, suffix_lens, softcap, window, scale, workspace
    )


@_cascade_op.register_fake
def _(q, k_shared, v_shared, k_suffix, v_suffix, suffix_lens, softcap, window, scale, workspace):
    b, hq, dh = q.shape
    return q.new_empty((b, hq, dh)), q.new_empty((b, hq), dtype=torch.float32)


@torch.library.custom_op("cacheaug_cuda::merge_states", mutates_args=())
def _merge_op(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    if o_a.dtype not in _DTYPES:
        raise TypeError(
            f"merge_states: the cuda backend supports float32, float16 and bfloat16, got {o_a.dtype}"
        )
    shape = o_a.shape
    dh = shape[-1]
    o = torch.empty(shape, dtype=o_a.dtype, device=o_a.device)
    lse = torch.empty(shape[:-1], dtype=torch.float32, device=o_a.device)
    n = lse.numel()
    if n == 0 or dh == 0:
        return o, torch.logaddexp(lse_a, lse_b).to(torch.float32)
    oa, ob = o_a.reshape(n, dh), o_b.reshape(n, dh)
    la, lb = lse_a.reshape(n), lse_b.reshape(n)
    C = _ext()
    with torch.cuda.device(o_a.device):
        C.merge_states(
            _DTYPES[o_a.dtype], n, dh, oa.data_ptr(), *oa.stride(), la.data_ptr(), *la.stride(),
            ob.data_ptr(), *ob.stride(), lb.data_ptr(), *lb.stride(), o.data_ptr(), dh, 1, lse.data_ptr(), 1,
            _stream(o_a.device),
        )
    return o, lse


@_merge_op.register_fake
def _(o_a, lse_a, o_b, lse_b):
    return torch.empty_like(o_a), lse_a.new_empty(o_a.shape[:-1], dtype=torch.float32)


def decode_attention(
    q: Tensor, k: Tensor, v: Tensor, lens: Tensor, *, softcap: float | None = None, window: int | None = None,
    scale: float | None = None, return_lse: bool = False, workspace: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """ops.decode_attention on the CUDA kernels; ``workspace`` from ops.plan_decode (else per call)."""
    o, lse = _decode_op(q, k, v, lens, softcap, window, scale, workspace)
    return (o, lse) if return_lse else o


def cascade_decode(
    q: Tensor, k_shared: Tensor, v_shared: Tensor, k_suffix: Tensor, v_suffix: Tensor, suffix_lens: Tensor, *,
    softcap: float | None = None, window: int | None = None, scale: float | None = None, return_lse: bool = False,
    workspace: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """ops.cascade_decode on the CUDA kernels; ``workspace`` from ops.plan_decode (else per call)."""
    o, lse = _cascade_op(q, k_shared, v_shared, k_suffix, v_suffix, suffix_lens, softcap, window, scale, workspace)
    return (o, lse) if return_lse else o


def merge_states(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    return _merge_op(o_a, lse_a, o_b, lse_b)


__all__ = ["decode_attention", "cascade_decode", "merge_states", "workspace", "HEAD_DIMS"]

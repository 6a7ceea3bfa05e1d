"""The built CUDA extension in CPU CI: it imports, and without a GPU every call raises a
clear "no CUDA device" error (never a crash). Skipped only when the extension was not
built (CACHEAUG_BUILD_CUDA=0); set CACHEAUG_REQUIRE_EXT=1 to turn that skip into a failure.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

import cacheaug_engine
from cacheaug_engine import ops


def _load_ext():
    try:
        return importlib.import_module("cacheaug_engine._C")
    except ImportError as exc:
        if os.environ.get("CACHEAUG_REQUIRE_EXT") == "1":
            pytest.fail(f"CACHEAUG_REQUIRE_EXT=1 but cacheaug_engine._C does not import: {exc}")
        pytest.skip(f"cacheaug_engine._C was not built (install with CACHEAUG_BUILD_CUDA=1): {exc}")


no_gpu = pytest.mark.skipif(
    torch.cuda.is_available(), reason="a CUDA device is present: covered by test_decode_cuda"
)


def test_extension_imports_and_describes_itself():
    C = _load_ext()
    assert C.__file__.endswith(".so")
    assert tuple(C.HEAD_DIMS) == (64, 128, 256)
    assert (C.FLOAT32, C.FLOAT16, C.BFLOAT16) == (0, 1, 2)
    assert issubclass(C.NoCudaDeviceError, RuntimeError)
    for name in (
        "check_device",
        "decode_workspace",
        "cascade_workspace",
        "decode_attention",
        "cascade_decode",
        "merge_states",
    ):
        assert callable(getattr(C, name))


def _lens_out_args(o_strides):
    """lens (null, int32, stride 1), o, lse, scale, softcap, window, num_splits, workspace, bytes, stream."""
    return [0, False, 1, 0, o_strides, 0, [], 0.1, 0.0, 0, 0, 0, 0, 0]


def _decode_args(q_strides, kv_strides, o_strides):
    """_C.decode_attention arguments (dtype, B, Hq, Hkv, Tmax, Dh, then pointers) with null pointers."""
    return [2, 1, 8, 2, 16, 128, 0, q_strides, 0, kv_strides, 0, kv_strides, *_lens_out_args(o_strides)]


@no_gpu
def test_calls_without_gpu_raise_no_cuda_device():
    C = _load_ext()
    with pytest.raises(C.NoCudaDeviceError, match="no CUDA device"):
        C.check_device()
    with pytest.raises(C.NoCudaDeviceError, match="no CUDA device"):
        C.decode_workspace(1, 8, 2, 128, 128)
    with pytest.raises(C.NoCudaDeviceError, match="no CUDA device"):
        C.decode_attention(*_decode_args([1024, 128, 1], [4096, 2048, 128, 1], [1024, 128, 1]))
    with pytest.raises(C.NoCudaDeviceError, match="no CUDA device"):
        C.cascade_decode(
            *[2, 1, 8, 2, 16, 4, 128],  # dtype, B, Hq, Hkv, T, L, Dh
            *[0, [1024, 128, 1], 0, [2048, 128, 1], 0, [2048, 128, 1]],  # q, k_shared, v_shared
            *[0, [1024, 512, 128, 1], 0, [1024, 512, 128, 1]],  # k_suffix, v_suffix
            *_lens_out_args([1024, 128, 1]),
        )
    with pytest.raises(C.NoCudaDeviceError, match="no CUDA device"):
        C.merge_states(2, 4, 128, 0, 128, 1, 0, 1, 0, 128, 1, 0, 1, 0, 128, 1, 0, 1, 0)


@pytest.mark.parametrize(
    "q_st, kv_st, o_st, needle",
    [([1, 1], [1, 1, 1, 1], [1, 1, 1], "q needs 3 strides, got 2"),
     ([1, 1, 1], [1, 1, 1], [1, 1, 1], "k needs 4 strides, got 3"),
     ([1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], "o needs 3 strides, got 4")],
    ids=["q", "k", "o"],
)
def test_bad_stride_list_is_a_value_error(q_st, kv_st, o_st, needle):
    """The stride lists are checked before anything touches a device, so the error is the ValueError
    naming the list on any machine (a NoCudaDeviceError here would mean the check is gone)."""
    C = _load_ext()
    with pytest.raises(ValueError, match=needle) as info:
        C.decode_attention(*_decode_args(q_st, kv_st, o_st))
    assert not isinstance(info.value, C.NoCudaDeviceError)


@no_gpu
def test_backend_reports_why_cuda_is_unavailable():
    _load_ext()
    info = cacheaug_engine.backends()["cuda"]
    assert info["available"] is False and "no CUDA device" in info["reason"]
    q = torch.randn(1, 4, 64)
    k = torch.randn(1, 2, 8, 64)
    with pytest.raises(cacheaug_engine.BackendUnavailableError, match="cuda backend runs on CUDA tensors, got cpu"):
        ops.decode_attention(q, k, k, torch.tensor([8]), backend="cuda")


def test_cuda_ops_register_fake_kernels():
    """The custom ops trace with fake tensors (torch.compile) without a GPU or the extension."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cacheaug_engine.ops.cuda import launch as cuda_ops

    with FakeTensorMode():
        q = torch.empty(2, 8, 128, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(2, 2, 64, 128, dtype=torch.bfloat16, device="cuda")
        ks = torch.empty(2, 64, 128, dtype=torch.bfloat16, device="cuda")
        lens = torch.empty(2, dtype=torch.int32, device="cuda")
        o, lse = cuda_ops.decode_attention(q, k, k, lens, return_lse=True)
        assert o.shape == (2, 8, 128) and o.dtype == torch.bfloat16 and lse.shape == (2, 8)
        assert lse.dtype == torch.float32
        o, lse = cuda_ops.cascade_decode(q, ks, ks, k, k, lens, return_lse=True, window=16)
        assert o.shape == (2, 8, 128) and lse.shape == (2, 8)
        o2, lse2 = cuda_ops.merge_states(o, lse, o, lse)
        assert o2.shape == o.shape and lse2.shape == lse.shape


def test_interop_parses_dlpack_and_cuda_array_interface():
    """Array descriptions (pointer, shape, element strides, dtype) without torch on the kernel path."""
    from cacheaug_engine.ops.cuda import interop

    base = torch.randn(4, 6, 8, dtype=torch.bfloat16)
    view = base.transpose(0, 1)[1:, :, ::2]
    a = interop.as_array(view, require_cuda=False)
    assert a.shape == tuple(view.shape) and a.strides == tuple(view.stride()) and a.dtype == "bfloat16"
    assert a.ptr == view.data_ptr()

    class FakeCai:  # a producer that only speaks __cuda_array_interface__ (byte strides)
        __cuda_array_interface__ = {
            "shape": (3, 5),
            "typestr": "<f2",
            "data": (1234, False),
            "strides": (20, 4),
            "version": 3,
        }

    c = interop.as_array(FakeCai())
    assert (c.ptr, c.shape, c.strides, c.dtype) == (1234, (3, 5), (10, 2), "float16")
    with pytest.raises(ValueError, match="CUDA"):
        interop.as_array(torch.zeros(2, 2))
    with pytest.raises(TypeError, match="CUDA array"):
        interop.as_array([1, 2, 3])

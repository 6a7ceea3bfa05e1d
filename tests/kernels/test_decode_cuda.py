"""The `cuda` decode backend (csrc/ through cacheaug_engine._C) vs the torch reference.

Runs on a GPU only (marked `cuda`, skipped without one). Tolerance (flash-attention's
rule): the kernel's error against the fp32 reference is at most 2x the torch backend's
error at the same dtype, plus a tiny floor. Also checks agreement with the triton backend,
the split heuristic paths (one split / many splits), torch.compile, and the interop path.
"""

from __future__ import annotations

import pytest
import torch
from decode_cases import (
    CUDA_CASCADE_CASES,
    CUDA_CASCADE_OPTIONS,
    CUDA_DECODE_CASES,
    CUDA_DECODE_OPTIONS,
    merge_states_case,
    run_cascade,
    run_decode,
)

from cacheaug_engine import ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DEVICE = "cuda"


@pytest.mark.parametrize("case", CUDA_DECODE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_matches_reference(case, dtype):
    run_decode("cuda", DEVICE, *case, dtype=dtype)


@pytest.mark.parametrize("opts", CUDA_DECODE_OPTIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_options(opts, dtype):
    run_decode("cuda", DEVICE, 3, 8, 2, 1067, 128, [1067, 2, 500], dtype, **opts)


@pytest.mark.parametrize("dh", [64, 128, 256])
def test_decode_strided_views(dh):
    run_decode("cuda", DEVICE, 2, 4, 2, 333, dh, [333, 20], torch.float16, strided=True, window=120)
    run_decode("cuda", DEVICE, 2, 8, 2, 333, dh, [1, 333], torch.bfloat16, strided=True)


def test_decode_long_cache_one_request():
    run_decode("cuda", DEVICE, 1, 32, 8, 32768, 128, [32768], torch.bfloat16)


@pytest.mark.parametrize("case", CUDA_CASCADE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cascade_matches_reference(case, dtype):
    run_cascade("cuda", DEVICE, *case, dtype=dtype)


@pytest.mark.parametrize("opts", CUDA_CASCADE_OPTIONS)
def test_cascade_options(opts):
    run_cascade("cuda", DEVICE, 9, 8, 2, 1040, 7, 128, [7, 0, 3, 1, 2, 4, 5, 6, 7], torch.bfloat16, **opts)


def test_cascade_strided_views():
    run_cascade("cuda", DEVICE, 3, 4, 2, 290, 5, 128, [5, 2, 0], torch.bfloat16, strided=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_states(dtype):
    merge_states_case("cuda", DEVICE, 128, dtype)


def test_default_backend_on_cuda_is_cuda():
    from cacheaug_engine.ops.backends import resolve_backend

    assert resolve_backend("decode_attention", None, torch.device("cuda")) == "cuda"


def test_unsupported_head_dim_is_rejected_clearly():
    q = torch.randn(1, 2, 80, device=DEVICE)
    k = torch.randn(1, 1, 4, 80, device=DEVICE)
    with pytest.raises(ValueError, match="head dims"):
        ops.decode_attention(q, k, k, torch.tensor([4], device=DEVICE), backend="cuda")


def test_decode_under_torch_compile():
    torch.manual_seed(3)
    q = torch.randn(2, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(2, 2, 300, 128, device=DEVICE, dtype=torch.bfloat16)
    lens = torch.tensor([300, 7], device=DEVICE)
    from cacheaug_engine.ops.cuda import launch as cuda_ops

    fn = torch.compile(lambda *a: cuda_ops.decode_attention(*a, return_lse=True), fullgraph=True)
    o, lse = fn(q, k, k, lens)
    o_ref, lse_ref = cuda_ops.decode_attention(q, k, k, lens, return_lse=True)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(lse, lse_ref)


def test_opcheck():
    from cacheaug_engine.ops.cuda import launch as cuda_ops

    q = torch.randn(2, 8, 64, device=DEVICE, dtype=torch.float16)
    k = torch.randn(2, 2, 50, 64, device=DEVICE, dtype=torch.float16)
    lens = torch.tensor([50, 3], device=DEVICE, dtype=torch.int32)
    torch.library.opcheck(cuda_ops._decode_op, (q, k, k, lens, None, None, None, None))
    ks = torch.randn(2, 20, 64, device=DEVICE, dtype=torch.float16)
    torch.library.opcheck(cuda_ops._cascade_op, (q, ks, ks, k, k, lens, 10.0, 8, None, None))


def test_interop_with_torch_and_cupy():
    from cacheaug_engine.ops.cuda import interop

    torch.manual_seed(4)
    q = torch.randn(2, 8, 128, device=DEVICE, dtype=torch.float16)
    k = torch.randn(2, 2, 300, 128, device=DEVICE, dtype=torch.float16)
    lens = torch.tensor([300, 7], device=DEVICE, dtype=torch.int32)
    o_ref, lse_ref = ops.decode_attention(q, k, k, lens, return_lse=True, backend="cuda")
    o, lse = interop.decode_attention(q, k, k, lens)  # torch tensors through DLPack / CAI
    torch.cuda.synchronize()
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(lse, lse_ref)
    cupy = pytest.importorskip("cupy")
    qc, kc, lc = cupy.asarray(q), cupy.asarray(k), cupy.asarray(lens)
    oc, lsec = interop.decode_attention(qc, kc, kc, lc)
    cupy.cuda.get_current_stream().synchronize()
    torch.testing.assert_close(torch.as_tensor(oc, device=DEVICE), o_ref)
    ks = cupy.asarray(k[0])
    oc, lsec = interop.cascade_decode(qc, ks, ks, kc[:, :, :5], kc[:, :, :5], lc % 5)
    o2, _ = ops.cascade_decode(
        q, k[0], k[0], k[:, :, :5], k[:, :, :5], lens % 5, return_lse=True, backend="cuda"
    )
    cupy.cuda.get_current_stream().synchronize()
    torch.testing.assert_close(torch.as_tensor(oc, device=DEVICE), o2)

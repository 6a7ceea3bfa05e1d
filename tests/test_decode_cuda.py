"""The `cuda` decode backend (csrc/ through cacheaug_engine._C) vs the torch reference.

Runs on a GPU only (marked `cuda`, skipped without one). Tolerance (flash-attention's
rule): the kernel's error against the fp32 reference is at most 2x the torch backend's
error at the same dtype, plus a tiny floor. Also checks agreement with the triton backend,
the split heuristic paths (one split / many splits), torch.compile, and the interop path.
"""

from __future__ import annotations

import pytest
import torch

from cacheaug_engine import ops, reference
from cacheaug_engine.ops import torch_impl

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DEVICE = "cuda"

FLOOR = {torch.float32: 2e-5, torch.float16: 2e-4, torch.bfloat16: 1e-3}


def _rand(*shape, dtype, strided=False):
    """A random tensor; strided=True returns a non-contiguous view (permuted + sliced)."""
    if not strided:
        return torch.randn(*shape, device=DEVICE).to(dtype)
    big = torch.randn(*shape[:-1], shape[-1] * 2 + 3, device=DEVICE).to(dtype)
    view = big[..., 1 : 1 + 2 * shape[-1] : 2]  # stride 2 along Dh
    if view.dim() >= 3:
        view = view.transpose(-2, -3).contiguous().transpose(-2, -3)  # swap the two leading strides
    assert not view.is_contiguous()
    return view


def _check(out, lse, ref_out, ref_lse, torch_out, torch_lse, dtype):
    floor = FLOOR[dtype]
    err = (out.float() - ref_out).abs().max().item()
    base = (torch_out.float() - ref_out).abs().max().item()
    assert err <= 2 * base + floor, f"o error {err:.3g} > 2 x torch error {base:.3g} + {floor}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse -inf pattern differs from the reference"
    assert torch.all(out.float()[~finite] == 0), "empty rows must give o = 0"
    if finite.any():
        lerr = (lse - ref_lse)[finite].abs().max().item()
        lbase = (torch_lse - ref_lse)[finite].abs().max().item()
        assert lerr <= 2 * lbase + 1e-4, f"lse error {lerr:.3g} > 2 x torch error {lbase:.3g}"


def _run_decode(backend, b, hq, hkv, tmax, dh, lens, dtype, strided=False, **opts):
    torch.manual_seed(b * 7 + hq + tmax + dh)
    q = _rand(b, hq, dh, dtype=dtype, strided=strided)
    k = _rand(b, hkv, tmax, dh, dtype=dtype, strided=strided)
    v = _rand(b, hkv, tmax, dh, dtype=dtype, strided=strided)
    lens = torch.tensor(lens, device=DEVICE, dtype=torch.int32)
    out, lse = ops.decode_attention(q, k, v, lens, return_lse=True, backend=backend, **opts)
    ref_out, ref_lse = reference.decode_attention(
        q.float(), k.float(), v.float(), lens, return_lse=True, **opts
    )
    t_out, t_lse = torch_impl.decode_attention(q, k, v, lens, return_lse=True, **opts)
    assert out.shape == q.shape and out.dtype == dtype and lse.dtype == torch.float32
    _check(out, lse, ref_out, ref_lse, t_out, t_lse, dtype)


def _run_cascade(backend, b, hq, hkv, t, length, dh, suffix_lens, dtype, strided=False, **opts):
    torch.manual_seed(b * 5 + hq + t + length + dh)
    q = _rand(b, hq, dh, dtype=dtype, strided=strided)
    ks = _rand(hkv, t, dh, dtype=dtype, strided=strided)
    vs = _rand(hkv, t, dh, dtype=dtype, strided=strided)
    kx = _rand(b, hkv, length, dh, dtype=dtype, strided=strided)
    vx = _rand(b, hkv, length, dh, dtype=dtype, strided=strided)
    sl = torch.tensor(suffix_lens, device=DEVICE, dtype=torch.int64)
    out, lse = ops.cascade_decode(q, ks, vs, kx, vx, sl, return_lse=True, backend=backend, **opts)
    f = [x.float() for x in (q, ks, vs, kx, vx)]
    ref_out, ref_lse = reference.cascade_decode(*f, sl, return_lse=True, **opts)
    t_out, t_lse = torch_impl.cascade_decode(q, ks, vs, kx, vx, sl, return_lse=True, **opts)
    _check(out, lse, ref_out, ref_lse, t_out, t_lse, dtype)


DECODE_CASES = [
    # b, hq, hkv, tmax, dh, lens
    (3, 4, 4, 37, 64, [37, 1, 0]),  # MHA, full / length 1 / empty
    (2, 32, 8, 3001, 128, [3001, 1299]),  # Llama-3 heads (GQA 4), many splits
    (2, 8, 1, 45, 256, [45, 17]),  # GQA 8, Dh 256
    (1, 2, 1, 1, 64, [1]),  # a single key
    (3, 16, 1, 77, 128, [77, 5, 60]),  # MQA with 16 heads: two row tiles per request
    (64, 32, 8, 130, 128, [130] * 32 + list(range(1, 33))),  # big batch: one split, no reduction
]


@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_matches_reference(case, dtype):
    _run_decode("cuda", *case, dtype=dtype)


@pytest.mark.parametrize(
    "opts", [dict(softcap=5.0), dict(window=9), dict(window=1), dict(scale=0.3, softcap=20.0, window=400)]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_options(opts, dtype):
    _run_decode("cuda", 3, 8, 2, 1067, 128, [1067, 2, 500], dtype, **opts)


@pytest.mark.parametrize("dh", [64, 128, 256])
def test_decode_strided_views(dh):
    _run_decode("cuda", 2, 4, 2, 333, dh, [333, 20], torch.float16, strided=True, window=120)
    _run_decode("cuda", 2, 8, 2, 333, dh, [1, 333], torch.bfloat16, strided=True)


def test_decode_long_cache_one_request():
    _run_decode("cuda", 1, 32, 8, 32768, 128, [32768], torch.bfloat16)


CASCADE_CASES = [
    # b, hq, hkv, t, length, dh, suffix_lens
    (3, 4, 4, 40, 6, 64, [6, 0, 1]),  # empty and length-1 suffixes
    (5, 8, 2, 333, 9, 128, [9, 3, 0, 8, 1]),  # GQA 4
    (2, 8, 1, 17, 3, 256, [2, 3]),  # GQA 8, Dh 256
    (2, 4, 2, 0, 4, 64, [4, 1]),  # no shared prefix
    (2, 4, 2, 21, 0, 64, [0, 0]),  # no suffix at all
    (32, 32, 8, 2049, 70, 128, [i * 2 for i in range(32)]),  # 128 rows per KV head: two row tiles
    (3, 8, 2, 5, 3, 128, [3, 2, 1]),  # 12 rows: the 2x2 warp layout
]


@pytest.mark.parametrize("case", CASCADE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cascade_matches_reference(case, dtype):
    _run_cascade("cuda", *case, dtype=dtype)


@pytest.mark.parametrize("opts", [dict(softcap=7.0), dict(window=5), dict(window=300, softcap=3.0)])
def test_cascade_options(opts):
    _run_cascade("cuda", 9, 8, 2, 1040, 7, 128, [7, 0, 3, 1, 2, 4, 5, 6, 7], torch.bfloat16, **opts)


def test_cascade_strided_views():
    _run_cascade("cuda", 3, 4, 2, 290, 5, 128, [5, 2, 0], torch.bfloat16, strided=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_states(dtype):
    torch.manual_seed(2)
    o_a = torch.randn(3, 5, 128, device=DEVICE).to(dtype)
    o_b = torch.randn(3, 5, 128, device=DEVICE).to(dtype)
    lse_a, lse_b = torch.randn(3, 5, device=DEVICE), torch.randn(3, 5, device=DEVICE)
    lse_a[0, 0] = float("-inf")
    lse_a[1, 1] = lse_b[1, 1] = float("-inf")
    o_b_strided = o_b.transpose(0, 1).contiguous().transpose(0, 1)
    out, lse = ops.merge_states(o_a, lse_a, o_b_strided, lse_b, backend="cuda")
    ref_out, ref_lse = reference.merge_states(o_a.float(), lse_a, o_b.float(), lse_b)
    t_out, t_lse = reference.merge_states(o_a, lse_a, o_b, lse_b)
    _check(out, lse, ref_out, ref_lse, t_out, t_lse, dtype)


def test_default_backend_on_cuda_is_cuda():
    from cacheaug_engine.backends import resolve_backend

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
    from cacheaug_engine import cuda_ops

    fn = torch.compile(lambda *a: cuda_ops.decode_attention(*a, return_lse=True), fullgraph=True)
    o, lse = fn(q, k, k, lens)
    o_ref, lse_ref = cuda_ops.decode_attention(q, k, k, lens, return_lse=True)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(lse, lse_ref)


def test_opcheck():
    from cacheaug_engine import cuda_ops

    q = torch.randn(2, 8, 64, device=DEVICE, dtype=torch.float16)
    k = torch.randn(2, 2, 50, 64, device=DEVICE, dtype=torch.float16)
    lens = torch.tensor([50, 3], device=DEVICE, dtype=torch.int32)
    torch.library.opcheck(cuda_ops._decode_op, (q, k, k, lens, None, None, None))
    ks = torch.randn(2, 20, 64, device=DEVICE, dtype=torch.float16)
    torch.library.opcheck(cuda_ops._cascade_op, (q, ks, ks, k, k, lens, 10.0, 8, None))


def test_interop_with_torch_and_cupy():
    from cacheaug_engine import interop

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

"""The `triton` decode backend vs the torch reference (CPU CI runs it under TRITON_INTERPRET=1).

Tolerance (flash-attention's rule): the kernel's error against the fp32 reference must be
at most 2x the error of the torch backend at the same dtype, plus a tiny floor.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter on CPU-only machines (conftest does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from cacheaug_engine import ops, reference  # noqa: E402
from cacheaug_engine.ops import torch_impl  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
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
    (2, 8, 2, 300, 128, [300, 129]),  # GQA 4, several splits
    (2, 8, 1, 45, 256, [45, 17]),  # GQA 8, Dh 256
    (1, 2, 1, 1, 64, [1]),  # a single key
]


@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_matches_reference(case, dtype):
    _run_decode("triton", *case, dtype=dtype)


@pytest.mark.parametrize(
    "opts", [dict(softcap=5.0), dict(window=9), dict(window=1), dict(scale=0.3, softcap=20.0, window=40)]
)
def test_decode_options(opts):
    _run_decode("triton", 3, 8, 2, 67, 64, [67, 2, 50], torch.bfloat16, **opts)


def test_decode_strided_views():
    _run_decode("triton", 2, 4, 2, 33, 64, [33, 20], torch.float16, strided=True, window=12)


def test_decode_forced_splits():
    from cacheaug_engine.triton_kernels import decode as td

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 64), torch.randn(2, 1, 50, 64), torch.randn(2, 1, 50, 64)
    lens = torch.tensor([50, 7])
    ref_out, ref_lse = reference.decode_attention(q, k, v, lens, return_lse=True)
    for splits in (1, 2, 7, 50):
        out, lse = td.decode_attention_impl(
            q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), lens.to(DEVICE), splits=splits
        )
        torch.testing.assert_close(out.cpu(), ref_out, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(lse.cpu(), ref_lse, atol=2e-5, rtol=1e-5)


CASCADE_CASES = [
    # b, hq, hkv, t, length, dh, suffix_lens
    (3, 4, 4, 40, 6, 64, [6, 0, 1]),  # empty and length-1 suffixes
    (5, 8, 2, 33, 9, 128, [9, 3, 0, 8, 1]),  # GQA 4, odd prefix, several request tiles
    (2, 8, 1, 17, 3, 256, [2, 3]),  # GQA 8, Dh 256
    (2, 4, 2, 0, 4, 64, [4, 1]),  # no shared prefix
    (2, 4, 2, 21, 0, 64, [0, 0]),  # no suffix at all
]


@pytest.mark.parametrize("case", CASCADE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cascade_matches_reference(case, dtype):
    _run_cascade("triton", *case, dtype=dtype)


@pytest.mark.parametrize("opts", [dict(softcap=7.0), dict(window=5), dict(window=30, softcap=3.0)])
def test_cascade_options(opts):
    _run_cascade("triton", 3, 8, 2, 40, 7, 64, [7, 0, 3], torch.float16, **opts)


def test_cascade_strided_views():
    _run_cascade("triton", 3, 4, 2, 29, 5, 64, [5, 2, 0], torch.bfloat16, strided=True)


def test_cascade_request_tiles():
    """The shared-prefix kernel applies each K/V block to a tile of requests; vary the tile."""
    from cacheaug_engine.triton_kernels import decode as td

    torch.manual_seed(1)
    b, hq, hkv, t, length, dh = 5, 4, 2, 70, 4, 64
    q = torch.randn(b, hq, dh, device=DEVICE)
    ks, vs = torch.randn(hkv, t, dh, device=DEVICE), torch.randn(hkv, t, dh, device=DEVICE)
    kx, vx = torch.randn(b, hkv, length, dh, device=DEVICE), torch.randn(b, hkv, length, dh, device=DEVICE)
    sl = torch.tensor([4, 0, 1, 3, 2], device=DEVICE)
    ref_out, ref_lse = reference.cascade_decode(q, ks, vs, kx, vx, sl, return_lse=True, window=50)
    for tile in (1, 2, 3, 5, 8):
        out, lse = td.cascade_decode_impl(
            q, ks, vs, kx, vx, sl, window=50, splits=3, requests_per_program=tile
        )
        torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_states(dtype):
    torch.manual_seed(2)
    o_a, o_b = torch.randn(3, 5, 64, device=DEVICE).to(dtype), torch.randn(3, 5, 64, device=DEVICE).to(dtype)
    lse_a, lse_b = torch.randn(3, 5, device=DEVICE), torch.randn(3, 5, device=DEVICE)
    lse_a[0, 0] = float("-inf")
    lse_a[1, 1] = lse_b[1, 1] = float("-inf")
    o_b_strided = o_b.transpose(0, 1).contiguous().transpose(0, 1)
    out, lse = ops.merge_states(o_a, lse_a, o_b_strided, lse_b, backend="triton")
    ref_out, ref_lse = reference.merge_states(o_a.float(), lse_a, o_b.float(), lse_b)
    t_out, t_lse = reference.merge_states(o_a, lse_a, o_b, lse_b)
    _check(out, lse, ref_out, ref_lse, t_out, t_lse, dtype)
    assert out[1, 1].abs().max() == 0 and lse[1, 1] == float("-inf")


def test_float64_rejected_clearly():
    q = torch.randn(1, 2, 64, dtype=torch.float64, device=DEVICE)
    k = torch.randn(1, 1, 4, 64, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="triton backend"):
        ops.decode_attention(q, k, k, torch.tensor([4], device=DEVICE), backend="triton")


def test_num_splits_heuristic():
    from cacheaug_engine.triton_kernels.decode import num_splits

    assert num_splits(8, 100, 132) == 1  # short caches: one chunk
    assert num_splits(8, 131072, 132) == 33  # few programs, long cache: fill ~2 waves
    assert num_splits(512, 131072, 132) == 1  # enough programs already
    assert num_splits(1, 10**7, 132) == 64  # capped

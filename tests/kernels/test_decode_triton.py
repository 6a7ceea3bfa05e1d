"""The `triton` decode backend vs the torch reference (CPU CI runs it under TRITON_INTERPRET=1).

Tolerance (flash-attention's rule): the kernel's error against the fp32 reference must be
at most 2x the error of the torch backend at the same dtype, plus a tiny floor.
"""

from __future__ import annotations

import os

import pytest
import torch

from cacheaug_engine.ops.backends import BackendUnavailableError

if not torch.cuda.is_available():  # the interpreter on CPU-only machines (conftest does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from decode_cases import merge_states_case, run_cascade, run_decode  # noqa: E402

from cacheaug_engine import ops
from cacheaug_engine.ops import reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


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
    run_decode("triton", DEVICE, *case, dtype=dtype)


@pytest.mark.parametrize(
    "opts", [dict(softcap=5.0), dict(window=9), dict(window=1), dict(scale=0.3, softcap=20.0, window=40)]
)
def test_decode_options(opts):
    run_decode("triton", DEVICE, 3, 8, 2, 67, 64, [67, 2, 50], torch.bfloat16, **opts)


def test_decode_strided_views():
    run_decode("triton", DEVICE, 2, 4, 2, 33, 64, [33, 20], torch.float16, strided=True, window=12)


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
    run_cascade("triton", DEVICE, *case, dtype=dtype)


@pytest.mark.parametrize("opts", [dict(softcap=7.0), dict(window=5), dict(window=30, softcap=3.0)])
def test_cascade_options(opts):
    run_cascade("triton", DEVICE, 3, 8, 2, 40, 7, 64, [7, 0, 3], torch.float16, **opts)


def test_cascade_strided_views():
    run_cascade("triton", DEVICE, 3, 4, 2, 29, 5, 64, [5, 2, 0], torch.bfloat16, strided=True)


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
    out, lse = merge_states_case("triton", DEVICE, 64, dtype)
    assert out[1, 1].abs().max() == 0 and lse[1, 1] == float("-inf")


def test_float64_rejected_clearly():
    q = torch.randn(1, 2, 64, dtype=torch.float64, device=DEVICE)
    k = torch.randn(1, 1, 4, 64, dtype=torch.float64, device=DEVICE)
    # capability dispatch refuses before any launch: a named backend that cannot run says why
    with pytest.raises(BackendUnavailableError, match="triton.*float64"):
        ops.decode_attention(q, k, k, torch.tensor([4], device=DEVICE), backend="triton")


def test_num_splits_heuristic():
    from cacheaug_engine.triton_kernels.decode import num_splits

    assert num_splits(8, 100, 132) == 1  # short caches: one chunk
    assert num_splits(8, 131072, 132) == 33  # few programs, long cache: fill ~2 waves
    assert num_splits(512, 131072, 132) == 1  # enough programs already
    assert num_splits(1, 10**7, 132) == 64  # capped


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
def test_lens_read_through_their_stride(dtype):
    """A strided lens view (every other entry) gives the right lengths (issue 21: the kernel read
    lens[b] at b, ignoring the stride, in decode and cascade alike)."""
    torch.manual_seed(5)
    q, k, v = torch.randn(2, 4, 64), torch.randn(2, 2, 40, 64), torch.randn(2, 2, 40, 64)
    lens = torch.tensor([40, 3, 17, 5], dtype=dtype)[::2]  # [40, 17]
    assert lens.stride(0) == 2
    out, lse = ops.decode_attention(*(x.to(DEVICE) for x in (q, k, v, lens)), return_lse=True, backend="triton")
    ref_out, ref_lse = reference.decode_attention(q, k, v, lens, return_lse=True)
    torch.testing.assert_close(out.cpu(), ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=2e-5, rtol=1e-4)
    ks, vs = torch.randn(2, 9, 64), torch.randn(2, 9, 64)
    sl = torch.tensor([1, 0, 40, 0], dtype=dtype)[::2]  # [1, 40]
    out, lse = ops.cascade_decode(*(x.to(DEVICE) for x in (q, ks, vs, k, v, sl)), return_lse=True,
                                  backend="triton")
    ref_out, ref_lse = reference.cascade_decode(q, ks, vs, k, v, sl, return_lse=True)
    torch.testing.assert_close(out.cpu(), ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=2e-5, rtol=1e-4)


def test_merge_states_plus_inf_lse():
    """reference.merge_states: an lse of +inf gives lse +inf and o NaN (it gave lse NaN)."""
    torch.manual_seed(1)
    o_a, o_b = torch.randn(6, 64), torch.randn(6, 64)
    inf, nan = float("inf"), float("nan")
    lse_a = torch.tensor([inf, inf, inf, 0.5, nan, -inf])
    lse_b = torch.tensor([1.0, -inf, inf, inf, inf, inf])
    o, lse = ops.merge_states(*(x.to(DEVICE) for x in (o_a, lse_a, o_b, lse_b)), backend="triton")
    ref_o, ref_l = reference.merge_states(o_a, lse_a, o_b, lse_b)
    lse, o = lse.cpu(), o.cpu()
    assert torch.equal(torch.isnan(lse), torch.isnan(ref_l)) and torch.equal(lse == inf, ref_l == inf), (lse, ref_l)
    assert torch.equal(torch.isnan(o), torch.isnan(ref_o))

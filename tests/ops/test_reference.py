"""The ground truth (reference.py) and the torch backend against explicit-mask SDPA, in fp64."""

from __future__ import annotations

import pytest
import torch
from dense_reference import dense_attention, segment_mask

from cacheaug_engine import ops
from cacheaug_engine.ops import reference

F64 = torch.float64

# (B, Hq, Hkv, N, S, T, Dh, causal, window, softcap)
SEGMENT_CASES = [
    (1, 1, 1, 1, 1, 0, 8, True, None, None),  # S = 1, empty prefix
    (2, 4, 2, 3, 5, 11, 16, True, None, None),  # odd sizes, GQA 2
    (2, 6, 2, 2, 7, 9, 8, True, 4, None),  # window
    (1, 3, 3, 4, 3, 13, 8, False, None, 30.0),  # non-causal + softcap
    (2, 8, 1, 2, 6, 10, 16, True, 5, 50.0),  # MQA + window + softcap
]


def _segment_inputs(b, hq, hkv, n, s, t, dh, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n * s, dh, dtype=F64, generator=g)
    k = torch.randn(b, hkv, n * s, dh, dtype=F64, generator=g)
    v = torch.randn(b, hkv, n * s, dh, dtype=F64, generator=g)
    kp = torch.randn(b, hkv, t, dh, dtype=F64, generator=g)
    vp = torch.randn(b, hkv, t, dh, dtype=F64, generator=g)
    lens = torch.randint(0, t + 1, (b, n), generator=g, dtype=torch.int32)
    lens[0, 0] = 0  # p_k = 0 always present
    lens[-1, -1] = t  # p_k = T always present
    return q, k, v, kp, vp, lens


@pytest.mark.parametrize("case", SEGMENT_CASES)
def test_segment_reference_and_torch_backend_match_dense_sdpa(case):
    b, hq, hkv, n, s, t, dh, causal, window, softcap = case
    q, k, v, kp, vp, lens = _segment_inputs(b, hq, hkv, n, s, t, dh)
    mask = segment_mask(lens, t, s, causal, window)
    o_dense, lse_dense = dense_attention(
        q, torch.cat([kp, k], 2), torch.cat([vp, v], 2), mask, softcap=softcap
    )
    kwargs = dict(block_len=s, causal=causal, window=window, softcap=softcap, return_lse=True)
    o_ref, lse_ref = reference.segment_attention(q, k, v, kp, vp, lens, **kwargs)
    o_t, lse_t = ops.segment_attention(q, k, v, kp, vp, lens, backend="torch", **kwargs)
    for o, lse in ((o_ref, lse_ref), (o_t, lse_t)):
        torch.testing.assert_close(o, o_dense, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse, lse_dense, rtol=1e-10, atol=1e-10)


NO_PREFIX_CASES = [
    (2, 4, 2, 3, 5, 0, 16, True, None, None),  # prefill-like: SDPA fast path
    (1, 6, 3, 2, 7, 0, 8, True, 3, None),  # window through an explicit mask
    (1, 2, 1, 2, 4, 0, 8, False, None, None),  # non-causal
]


@pytest.mark.parametrize("case", SEGMENT_CASES + NO_PREFIX_CASES)
def test_segment_torch_backend_without_lse_matches_dense_sdpa(case):
    """The paths taken without return_lse (fused softmax, SDPA when there is no prefix)."""
    b, hq, hkv, n, s, t, dh, causal, window, softcap = case
    q, k, v, kp, vp, lens = _segment_inputs(b, hq, hkv, n, s, t, dh, seed=8)
    mask = segment_mask(lens, t, s, causal, window)
    o_dense, _ = dense_attention(q, torch.cat([kp, k], 2), torch.cat([vp, v], 2), mask, softcap=softcap)
    kw = dict(block_len=s, causal=causal, window=window, softcap=softcap)
    torch.testing.assert_close(ops.segment_attention(q, k, v, kp, vp, lens, backend="torch", **kw), o_dense)


@pytest.mark.parametrize("case", SEGMENT_CASES[1:4] + NO_PREFIX_CASES[:2])
def test_segment_torch_backend_gradients_match_reference(case):
    b, hq, hkv, n, s, t, dh, causal, window, softcap = case
    inputs = _segment_inputs(b, hq, hkv, n, s, t, dh, seed=1)
    q, k, v = (x.clone().requires_grad_() for x in inputs[:3])
    kw = dict(block_len=s, causal=causal, window=window, softcap=softcap)
    grad = torch.randn(q.shape, dtype=F64)
    ref = torch.autograd.grad(reference.segment_attention(q, k, v, *inputs[3:], **kw), (q, k, v), grad)
    got = torch.autograd.grad(ops.segment_attention(q, k, v, *inputs[3:], backend="torch", **kw), (q, k, v), grad)
    for a, r in zip(got, ref, strict=False):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


def test_segment_torch_backend_fp16_within_tolerance_rule():
    q, k, v, kp, vp, lens = _segment_inputs(2, 4, 2, 3, 7, 19, 32, seed=2)
    kw = dict(block_len=7)
    exact = reference.segment_attention(q, k, v, kp, vp, lens, **kw)
    half = ops.segment_attention(*(x.half() for x in (q, k, v, kp, vp)), lens, backend="torch", **kw)
    assert half.dtype == torch.float16
    assert (half.double() - exact).abs().max() < 2e-3


DECODE_CASES = [
    # (B, Hq, Hkv, Tmax, Dh, lens, window, softcap)
    (3, 4, 1, 9, 16, [1, 9, 5], None, None),
    (2, 8, 2, 17, 8, [17, 3], 4, None),
    (2, 3, 3, 6, 8, [6, 2], None, 20.0),
]


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_reference_and_torch_backend_match_sdpa(case):
    b, hq, hkv, tmax, dh, lens, window, softcap = case
    g = torch.Generator().manual_seed(3)
    q = torch.randn(b, hq, dh, dtype=F64, generator=g)
    k = torch.randn(b, hkv, tmax, dh, dtype=F64, generator=g)
    v = torch.randn(b, hkv, tmax, dh, dtype=F64, generator=g)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    mask = torch.zeros(b, 1, tmax, dtype=torch.bool)
    for bi, n in enumerate(lens):
        lo = 0 if window is None else max(0, n - window)
        mask[bi, 0, lo:n] = True
    o_dense, lse_dense = dense_attention(q.unsqueeze(2), k, v, mask, softcap=softcap)
    kw = dict(window=window, softcap=softcap, return_lse=True)
    for o, lse in (
        reference.decode_attention(q, k, v, lens_t, **kw),
        ops.decode_attention(q, k, v, lens_t, backend="torch", **kw),
    ):
        torch.testing.assert_close(o, o_dense.squeeze(2), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse, lse_dense.squeeze(2), rtol=1e-10, atol=1e-10)


def test_decode_empty_request_gives_zero_and_minus_inf():
    q = torch.randn(2, 2, 8, dtype=F64)
    k = torch.randn(2, 2, 4, 8, dtype=F64)
    lens = torch.tensor([0, 3])
    for fn in (reference.decode_attention, lambda *a, **kw: ops.decode_attention(*a, backend="torch", **kw)):
        o, lse = fn(q, k, k, lens, return_lse=True)
        assert torch.all(o[0] == 0) and torch.all(torch.isneginf(lse[0]))
        assert torch.isfinite(lse[1]).all()


@pytest.mark.parametrize("window,softcap", [(None, None), (6, None), (None, 30.0)])
def test_cascade_equals_decode_on_concatenated_cache(window, softcap):
    g = torch.Generator().manual_seed(4)
    b, hq, hkv, t, length, dh = 3, 4, 2, 7, 5, 8
    q = torch.randn(b, hq, dh, dtype=F64, generator=g)
    ks, vs = (torch.randn(hkv, t, dh, dtype=F64, generator=g) for _ in range(2))
    kx, vx = (torch.randn(b, hkv, length, dh, dtype=F64, generator=g) for _ in range(2))
    suffix_lens = torch.tensor([0, 5, 2])
    k_cat = torch.cat([ks.expand(b, -1, -1, -1), kx], 2)
    v_cat = torch.cat([vs.expand(b, -1, -1, -1), vx], 2)
    kw = dict(window=window, softcap=softcap, return_lse=True)
    o_ref, lse_ref = reference.decode_attention(q, k_cat, v_cat, suffix_lens + t, **kw)
    for o, lse in (
        reference.cascade_decode(q, ks, vs, kx, vx, suffix_lens, **kw),
        ops.cascade_decode(q, ks, vs, kx, vx, suffix_lens, backend="torch", **kw),
    ):
        torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse, lse_ref, rtol=1e-10, atol=1e-10)


def test_merge_states_equals_attention_over_the_union():
    g = torch.Generator().manual_seed(5)
    b, hq, t, dh = 2, 3, 10, 8
    q = torch.randn(b, hq, dh, dtype=F64, generator=g)
    k, v = (torch.randn(b, hq, t, dh, dtype=F64, generator=g) for _ in range(2))
    full = torch.full((b,), t)
    o, lse = reference.decode_attention(q, k, v, full, return_lse=True)
    o_a, lse_a = reference.decode_attention(q, k[:, :, :4], v[:, :, :4], torch.full((b,), 4), return_lse=True)
    o_b, lse_b = reference.decode_attention(q, k[:, :, 4:], v[:, :, 4:], torch.full((b,), 6), return_lse=True)
    for fn in (reference.merge_states, lambda *a: ops.merge_states(*a, backend="torch")):
        o_m, lse_m = fn(o_a, lse_a, o_b, lse_b)
        torch.testing.assert_close(o_m, o, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse_m, lse, rtol=1e-10, atol=1e-10)
    # An empty side contributes nothing; two empty sides give zeros and -inf.
    empty = torch.full_like(lse_a, float("-inf"))
    o_m, lse_m = reference.merge_states(o_a, lse_a, torch.zeros_like(o_a), empty)
    torch.testing.assert_close(o_m, o_a)
    o_m, lse_m = reference.merge_states(o_a, empty, o_b, empty)
    assert torch.all(o_m == 0) and torch.all(torch.isneginf(lse_m))

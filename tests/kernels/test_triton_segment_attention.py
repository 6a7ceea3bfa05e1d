"""Fused Triton segment attention vs the torch reference (CPU CI: TRITON_INTERPRET=1).

On a machine with a GPU (and TRITON_INTERPRET unset) the same tests run on CUDA tensors
with compiled kernels; tests/kernels/test_triton_segment_attention_cuda.py adds bf16 and long
shapes there.

Tolerance (flash-attention's rule): against the fp32 reference on
the same (rounded) inputs, the kernel's error must be at most 2x the error of the same
computation done in PyTorch at the kernel's dtype (dense per-block attention, and the
torch backend), plus a tiny absolute floor.
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")
hyp = pytest.importorskip("hypothesis")
from cacheaug_engine.triton_kernels import segment_attention as sa  # noqa: E402
from cacheaug_engine.triton_kernels import segment_attention_configs as cfgs  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cacheaug_engine import ops  # noqa: E402
from cacheaug_engine.ops import reference, torch_impl  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _fixed_configs(monkeypatch):
    """On a GPU, use the fixed tile config: autotuning every tiny test shape would take minutes."""
    monkeypatch.setenv("CACHEAUG_AUTOTUNE", "0")


def make_case(b, hq, hkv, n, s, t, dh, lens=None, dtype=torch.float32, seed=0, strided=False):
    """Random inputs; lens: list of lists, or None for random p_k in [0, T]."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        x = torch.randn(*shape, generator=gen)
        if strided:  # a [B, L, H, Dh] buffer seen as [B, H, L, Dh]: non-contiguous, like a projection
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        return x.to(device=DEVICE, dtype=dtype)

    q, k, v = rnd(b, hq, n * s, dh), rnd(b, hkv, n * s, dh), rnd(b, hkv, n * s, dh)
    kp, vp = rnd(b, hkv, t, dh), rnd(b, hkv, t, dh)
    if lens is None:
        pl = torch.randint(0, t + 1, (b, n), generator=gen)
    else:
        pl = torch.tensor(lens)
    return q, k, v, kp, vp, pl.to(device=DEVICE, dtype=torch.int32)


def dense_at_dtype(q, k, v, kp, vp, pl, *, block_len, causal=True, softcap=None, window=None, scale=None,
                   return_lse=False):
    """Per-block dense attention computed entirely in the inputs' dtype (the tolerance baseline)."""
    b, hq, ns, dh = q.shape
    g, s = hq // k.shape[1], block_len
    scale = 1.0 / math.sqrt(dh) if scale is None else scale
    outs = []
    for bi in range(b):
        row = []
        for blk in range(ns // s):
            p, r = int(pl[bi, blk]), slice(blk * s, (blk + 1) * s)
            kk = torch.cat([kp[bi, :, :p], k[bi, :, r]], 1).repeat_interleave(g, 0)
            vv = torch.cat([vp[bi, :, :p], v[bi, :, r]], 1).repeat_interleave(g, 0)
            sc = (q[bi, :, r] @ kk.transpose(1, 2)) * scale
            if softcap is not None:
                sc = softcap * torch.tanh(sc / softcap)
            vis = reference.segment_visibility(p, s, causal=causal, window=window, device=q.device)
            row.append(torch.softmax(sc.masked_fill(~vis, float("-inf")), -1) @ vv)
        outs.append(torch.cat(row, 1))
    return torch.stack(outs)


def run_all(fn, inputs, opts, dtype, grad_out=None, grad_lse=None):
    """(o, lse, dq, dk, dv) of fn on inputs cast to dtype; grads of <o, grad_out> + <lse, grad_lse>."""
    q, k, v, kp, vp, pl = inputs
    q, k, v = (x.detach().to(dtype).requires_grad_(grad_out is not None) for x in (q, k, v))
    kp, vp = kp.to(dtype), vp.to(dtype)
    res = fn(q, k, v, kp, vp, pl, return_lse=grad_lse is not None or fn is not dense_at_dtype, **opts)
    o, lse = res if isinstance(res, tuple) else (res, None)
    if grad_out is None:
        return [o, lse]
    loss = (o.float() * grad_out).sum()
    if grad_lse is not None and lse is not None:
        loss = loss + (lse * grad_lse).sum()
    return [o, lse, *torch.autograd.grad(loss, (q, k, v))]


def check_case(inputs, opts, dtype=torch.float32, backward=True, lse_grad=True):
    """Triton vs the fp32 reference on dtype-rounded inputs, under the 2x-baseline rule."""
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
    q = inputs[0]
    gen = torch.Generator().manual_seed(1)
    go = torch.randn(q.shape, generator=gen).to(DEVICE) if backward else None
    gl = torch.randn(q.shape[:-1], generator=gen).to(DEVICE) if backward and lse_grad else None
    tri = run_all(sa.segment_attention, inputs, opts, dtype, go, gl)
    ref = run_all(reference.segment_attention, inputs, opts, torch.float32, go, gl)
    assert tri[0].dtype == dtype and tri[0].shape == q.shape
    assert tri[1].dtype == torch.float32 and tri[1].shape == q.shape[:-1]
    if dtype == torch.float32:
        bases = [[0.0] * len(ref)]
    else:
        bases = [run_all(torch_impl.segment_attention, inputs, opts, dtype, go, gl)]
        if go is None or gl is None:  # the dense baseline has no lse output
            dense = run_all(dense_at_dtype, inputs, opts, dtype, go, None)
            bases.append([dense[0], None, *dense[2:]])
    names = ("o", "lse", "dq", "dk", "dv")[: len(tri)]
    for idx, (name, got, want) in enumerate(zip(names, tri, ref, strict=True)):
        err = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
        base = 0.0
        for bl in bases:
            if isinstance(bl[idx], torch.Tensor) and got.numel():
                base = max(base, (bl[idx].float() - want.float()).abs().max().item())
        tol = 2 * base + FLOOR[dtype] * max(1.0, want.float().abs().max().item() if want.numel() else 1.0)
        assert err <= tol, f"{name}: error {err:.3g} > tolerance {tol:.3g} (baseline {base:.3g}, {dtype})"


# ----------------------------------------------------------------------------- hypothesis: fp32 vs reference


@st.composite
def cases(draw):
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 3, 8]))
    if group == 8:
        b, hkv = 1, 1  # keep the interpreter fast: MQA with 8 query heads
    n = draw(st.integers(1, 4))
    s = draw(st.sampled_from([1, 2, 5, 7, 16, 19]))
    t = draw(st.sampled_from([0, 1, 9, 17, 33]))
    dh = draw(st.sampled_from([16, 24, 32]))
    special = draw(st.sampled_from(["random", "zero", "full", "mixed"]))
    if special == "zero":
        lens = [[0] * n for _ in range(b)]
    elif special == "full":
        lens = [[t] * n for _ in range(b)]
    elif special == "mixed":
        lens = [[(0, t)[(i + j) % 2] for j in range(n)] for i in range(b)]
    else:
        lens = [sorted(draw(st.lists(st.integers(0, t), min_size=n, max_size=n))) for _ in range(b)]
    opts = dict(
        block_len=s,
        causal=draw(st.booleans()),
        softcap=draw(st.sampled_from([None, None, 0.8, 5.0])),
        window=draw(st.sampled_from([None, None, 1, 3, 11])),
        scale=draw(st.sampled_from([None, None, 0.3])),
    )
    seed = draw(st.integers(0, 2**16))
    return make_case(b, hkv * group, hkv, n, s, t, dh, lens=lens, seed=seed), opts


@settings(max_examples=30, deadline=None)
@given(cases())
def test_forward_matches_reference(case):
    inputs, opts = case
    check_case(inputs, opts, backward=False)


@settings(max_examples=25, deadline=None)
@given(cases())
def test_backward_matches_reference(case):
    inputs, opts = case
    check_case(inputs, opts, backward=True)


# ----------------------------------------------------------------------------- explicit edge cases

EDGE_CASES = {
    "T=0": (dict(b=1, hq=2, hkv=1, n=3, s=4, t=0, dh=16), None, {}),
    "p=0": (dict(b=2, hq=2, hkv=2, n=2, s=5, t=20, dh=16), [[0, 0], [0, 0]], {}),
    "p=T": (dict(b=1, hq=3, hkv=1, n=2, s=5, t=21, dh=16), [[21, 21]], {}),
    "S=1": (dict(b=1, hq=4, hkv=2, n=9, s=1, t=13, dh=16), None, {}),
    "N=1": (dict(b=1, hq=2, hkv=1, n=1, s=37, t=40, dh=32), [[25]], {}),
    "gqa8_window_softcap": (dict(b=1, hq=8, hkv=1, n=3, s=6, t=30, dh=16), [[3, 17, 30]],
                            dict(window=7, softcap=2.0)),
    "full_blocks_window": (dict(b=1, hq=3, hkv=3, n=2, s=9, t=25, dh=16), [[25, 4]],
                           dict(causal=False, window=5)),
    "unsorted_lens": (dict(b=1, hq=2, hkv=1, n=4, s=3, t=40, dh=16), [[40, 0, 35, 2]], {}),
}


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_cases(name):
    shape, lens, extra = EDGE_CASES[name]
    inputs = make_case(**shape, lens=lens, seed=3)
    check_case(inputs, dict(block_len=shape["s"], **extra), backward=True)


@pytest.mark.parametrize("dh", [64, 80, 96, 128, 256])
def test_head_dims_forward(dh):
    inputs = make_case(1, 2, 1, 2, 5, 11, dh, lens=[[3, 11]], seed=dh)
    check_case(inputs, dict(block_len=5, softcap=3.0 if dh == 256 else None), backward=False)


def test_head_dim_80_backward():
    inputs = make_case(1, 2, 1, 2, 5, 11, 80, lens=[[3, 11]], seed=4)
    check_case(inputs, dict(block_len=5), backward=True)


@pytest.mark.parametrize("opts", [dict(), dict(softcap=1.5, window=4)], ids=["plain", "softcap_window"])
def test_fp16_tolerance_rule(opts):
    inputs = make_case(1, 4, 2, 3, 7, 40, 32, seed=11)
    check_case(inputs, dict(block_len=7, **opts), dtype=torch.float16, backward=True, lse_grad=False)


def test_bf16_forward_interpreter_cast():
    # bf16 tl.dot is wrong in the interpreter; the launcher casts bf16 tiles to fp32 there.
    inputs = make_case(1, 2, 1, 2, 6, 14, 32, seed=5)
    check_case(inputs, dict(block_len=6), dtype=torch.bfloat16, backward=True, lse_grad=False)


def test_strided_inputs():
    inputs = make_case(2, 4, 2, 2, 5, 12, 32, seed=6, strided=True)
    assert not inputs[0].is_contiguous() and not inputs[3].is_contiguous()
    check_case(inputs, dict(block_len=5, window=6), backward=True)


# ----------------------------------------------------------------------------- backward specifics


def test_backward_with_expanded_grad():
    """out.sum().backward() hands the op a stride-0 expanded gradient."""
    inputs = make_case(1, 3, 1, 2, 5, 9, 16, lens=[[2, 9]], seed=7)
    grads = []
    for fn in (sa.segment_attention, reference.segment_attention):
        q, k, v = (x.detach().clone().requires_grad_() for x in inputs[:3])
        fn(q, k, v, *inputs[3:], block_len=5).sum().backward()
        grads.append((q.grad, k.grad, v.grad))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # lse.sum() too: its gradient is expanded as well.
    q, k, v = (x.detach().clone().requires_grad_() for x in inputs[:3])
    _, lse = sa.segment_attention(q, k, v, *inputs[3:], block_len=5, return_lse=True)
    lse.sum().backward()
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in inputs[:3])
    _, lse2 = reference.segment_attention(q2, k2, v2, *inputs[3:], block_len=5, return_lse=True)
    lse2.sum().backward()
    torch.testing.assert_close(q.grad, q2.grad, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(k.grad, k2.grad, atol=2e-5, rtol=1e-4)


def test_backward_is_deterministic():
    inputs = make_case(1, 6, 2, 3, 4, 10, 16, seed=8)
    go = torch.randn(inputs[0].shape).to(DEVICE)
    outs = []
    for _ in range(2):
        q, k, v = (x.detach().clone().requires_grad_() for x in inputs[:3])
        o = sa.segment_attention(q, k, v, *inputs[3:], block_len=4)
        outs.append(torch.autograd.grad((o * go).sum(), (q, k, v)))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("which", ["k_prefix", "v_prefix", "both"])
def test_prefix_requiring_grad_raises_before_launch(which, monkeypatch):
    q, k, v, kp, vp, pl = make_case(1, 2, 1, 2, 3, 5, 16, seed=9)
    if which in ("k_prefix", "both"):
        kp.requires_grad_()
    if which in ("v_prefix", "both"):
        vp.requires_grad_()

    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(sa, "forward", no_launch)
    with pytest.raises(ValueError, match="k_prefix" if which != "v_prefix" else "v_prefix") as info:
        sa.segment_attention(q, k, v, kp, vp, pl, block_len=3)
    if which == "both":
        assert "v_prefix" in str(info.value)
    with pytest.raises(ValueError, match="prefix"):
        ops.segment_attention(q, k, v, kp, vp, pl, block_len=3, backend="triton")
    with torch.no_grad():  # no graph, nothing to differentiate: allowed (reaches the launch)
        with pytest.raises(AssertionError, match="launched"):
            sa.segment_attention(q, k, v, kp, vp, pl, block_len=3)


def test_unsupported_inputs_raise_value_error():
    q, k, v, kp, vp, pl = make_case(1, 2, 1, 1, 3, 4, 16, seed=10)
    with pytest.raises(ValueError, match="^q: .*float64"):
        sa.segment_attention(q.double(), k.double(), v.double(), kp.double(), vp.double(), pl, block_len=3)
    big = make_case(1, 1, 1, 1, 2, 2, 272, seed=10)
    with pytest.raises(ValueError, match="^q: head dim"):
        sa.segment_attention(*big, block_len=2)


# ----------------------------------------------------------------------------- op plumbing


def test_opcheck():
    q, k, v, kp, vp, pl = make_case(1, 2, 1, 2, 3, 5, 16, lens=[[1, 4]], seed=12)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(sa.segment_attention_fwd, (q, k, v, kp, vp, pl, 3, True, None, None, 0.25))
    torch.library.opcheck(sa.segment_attention_fwd, (q, k, v, kp, vp, pl, 3, False, 2.0, 2, 0.25))


def test_ops_dispatch_triton_backend():
    inputs = make_case(1, 4, 2, 2, 5, 12, 16, seed=13)
    out, lse = ops.segment_attention(*inputs, block_len=5, softcap=4.0, return_lse=True, backend="triton")
    ref, ref_lse = ops.segment_attention(*inputs, block_len=5, softcap=4.0, return_lse=True, backend="torch")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_torch_compile_fwd_bwd():
    q, k, v, kp, vp, pl = make_case(1, 2, 1, 2, 3, 5, 16, lens=[[1, 4]], seed=14)
    q.requires_grad_()
    fn = torch.compile(lambda q: sa.segment_attention(q, k, v, kp, vp, pl, block_len=3).square().sum(),
                       fullgraph=True)
    fn(q).backward()
    q2 = q.detach().clone().requires_grad_()
    reference.segment_attention(q2, k, v, kp, vp, pl, block_len=3).square().sum().backward()
    torch.testing.assert_close(q.grad, q2.grad, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- configs


def test_interpreter_uses_fixed_config(monkeypatch):
    if not INTERPRET:
        pytest.skip("interpreter-only check")
    monkeypatch.setenv("CACHEAUG_AUTOTUNE", "1")
    assert not cfgs.autotune_enabled()
    assert cfgs.fixed_config("fwd", 128, torch.float16) == (16, 16, 4, 1)


def test_config_pruning(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("CACHEAUG_AUTOTUNE", "0")
    assert not cfgs.autotune_enabled()
    for kernel in cfgs.KERNELS:
        for dh in (64, 80, 96, 128, 256):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                bd = cfgs.block_d(dh)
                kept = cfgs.prune(kernel, cfgs.candidates(kernel), bd, dtype, rows=4096, device=None)
                assert kept, (kernel, dh, dtype)
                for c in kept:
                    bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
                    if bd == 256:
                        assert bm * bn <= 64 * 64 and c.num_stages <= 2
                    el = 4 if dtype == torch.float32 else 2
                    assert cfgs.smem_bytes(kernel, bm, bn, c.num_stages, bd, el) <= cfgs._DEFAULT_SMEM
                bm, bn, warps, stages = cfgs.fixed_config(kernel, dh, dtype)
                assert bm >= 16 and bn >= 16 and warps in (4, 8)
                el = 4 if dtype == torch.float32 else 2
                assert cfgs.smem_bytes(kernel, bm, bn, stages, bd, el) <= cfgs._DEFAULT_SMEM
    assert cfgs.block_d(80) == 128 and cfgs.block_d(96) == 128 and cfgs.block_d(8) == 16
    # tiny problems never get 128-row tiles
    kept = cfgs.prune("fwd", cfgs.candidates("fwd"), 64, torch.float16, rows=20, device=None)
    assert all(c.kwargs["BLOCK_M"] <= 32 for c in kept)

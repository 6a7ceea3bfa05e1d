"""Shared checks of the decode backends (test_decode_triton.py, test_decode_cuda.py).

Tolerance (flash-attention's rule): the kernel's error against the fp32 reference is at
most 2x the error of the torch backend at the same dtype, plus a tiny floor.
"""

from __future__ import annotations

import torch

from cacheaug_engine import ops
from cacheaug_engine.ops import reference, torch_impl

FLOOR = {torch.float32: 2e-5, torch.float16: 2e-4, torch.bfloat16: 1e-3}


def rand(*shape, dtype, device, strided=False):
    """A random tensor; strided=True returns a non-contiguous view (permuted + sliced)."""
    if not strided:
        return torch.randn(*shape, device=device).to(dtype)
    big = torch.randn(*shape[:-1], shape[-1] * 2 + 3, device=device).to(dtype)
    view = big[..., 1 : 1 + 2 * shape[-1] : 2]  # stride 2 along Dh
    if view.dim() >= 3:
        view = view.transpose(-2, -3).contiguous().transpose(-2, -3)  # swap the two leading strides
    assert not view.is_contiguous()
    return view


def check(out, lse, ref_out, ref_lse, torch_out, torch_lse, dtype):
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


def run_decode(backend, device, b, hq, hkv, tmax, dh, lens, dtype, strided=False, **opts):
    torch.manual_seed(b * 7 + hq + tmax + dh)
    q = rand(b, hq, dh, dtype=dtype, device=device, strided=strided)
    k = rand(b, hkv, tmax, dh, dtype=dtype, device=device, strided=strided)
    v = rand(b, hkv, tmax, dh, dtype=dtype, device=device, strided=strided)
    lens = torch.tensor(lens, device=device, dtype=torch.int32)
    out, lse = ops.decode_attention(q, k, v, lens, return_lse=True, backend=backend, **opts)
    ref_out, ref_lse = reference.decode_attention(
        q.float(), k.float(), v.float(), lens, return_lse=True, **opts
    )
    t_out, t_lse = torch_impl.decode_attention(q, k, v, lens, return_lse=True, **opts)
    assert out.shape == q.shape and out.dtype == dtype and lse.dtype == torch.float32
    check(out, lse, ref_out, ref_lse, t_out, t_lse, dtype)


def run_cascade(backend, device, b, hq, hkv, t, length, dh, suffix_lens, dtype, strided=False, **opts):
    torch.manual_seed(b * 5 + hq + t + length + dh)
    q = rand(b, hq, dh, dtype=dtype, device=device, strided=strided)
    ks = rand(hkv, t, dh, dtype=dtype, device=device, strided=strided)
    vs = rand(hkv, t, dh, dtype=dtype, device=device, strided=strided)
    kx = rand(b, hkv, length, dh, dtype=dtype, device=device, strided=strided)
    vx = rand(b, hkv, length, dh, dtype=dtype, device=device, strided=strided)
    sl = torch.tensor(suffix_lens, device=device, dtype=torch.int64)
    out, lse = ops.cascade_decode(q, ks, vs, kx, vx, sl, return_lse=True, backend=backend, **opts)
    f = [x.float() for x in (q, ks, vs, kx, vx)]
    ref_out, ref_lse = reference.cascade_decode(*f, sl, return_lse=True, **opts)
    t_out, t_lse = torch_impl.cascade_decode(q, ks, vs, kx, vx, sl, return_lse=True, **opts)
    check(out, lse, ref_out, ref_lse, t_out, t_lse, dtype)


def merge_states_case(backend, device, dh, dtype):
    """merge_states with -inf lse entries (one side / both sides empty) and a strided o_b."""
    torch.manual_seed(2)
    o_a = torch.randn(3, 5, dh, device=device).to(dtype)
    o_b = torch.randn(3, 5, dh, device=device).to(dtype)
    lse_a, lse_b = torch.randn(3, 5, device=device), torch.randn(3, 5, device=device)
    lse_a[0, 0] = float("-inf")
    lse_a[1, 1] = lse_b[1, 1] = float("-inf")
    o_b_strided = o_b.transpose(0, 1).contiguous().transpose(0, 1)
    out, lse = ops.merge_states(o_a, lse_a, o_b_strided, lse_b, backend=backend)
    ref_out, ref_lse = reference.merge_states(o_a.float(), lse_a, o_b.float(), lse_b)
    t_out, t_lse = reference.merge_states(o_a, lse_a, o_b, lse_b)
    check(out, lse, ref_out, ref_lse, t_out, t_lse, dtype)
    return out, lse

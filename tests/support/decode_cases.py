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
    """A random tensor; strided=True returns a non-contiguous view: stride 2 along Dh, starting one
    element into its storage (so no 16-byte vector path applies), and for 3+ dims the two
    dims before the last stored swapped (their strides out of order)."""
    if not strided:
        return torch.randn(*shape, device=device).to(dtype)
    lead = list(shape[:-1])
    if len(lead) >= 2:
        lead[-1], lead[-2] = lead[-2], lead[-1]
    big = torch.randn(*lead, shape[-1] * 2 + 3, device=device).to(dtype)
    view = big[..., 1 : 1 + 2 * shape[-1] : 2]  # stride 2 along Dh
    if view.dim() >= 3:
        view = view.transpose(-2, -3)  # swap the two leading strides (a view: no copy)
    assert tuple(view.shape) == tuple(shape) and view.stride(-1) == 2 and not view.is_contiguous()
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


# The CUDA backend's cases (tests/test_decode_cuda.py on a GPU, tests/cuda_emu under the emulator).
CUDA_DECODE_CASES = [
    # b, hq, hkv, tmax, dh, lens
    (3, 4, 4, 37, 64, [37, 1, 0]),  # MHA, full / length 1 / empty
    (2, 32, 8, 3001, 128, [3001, 1299]),  # Llama-3 heads (GQA 4), many splits
    (2, 8, 1, 45, 256, [45, 17]),  # GQA 8, Dh 256
    (1, 2, 1, 1, 64, [1]),  # a single key
    (3, 16, 1, 77, 128, [77, 5, 60]),  # MQA with 16 heads: two row tiles per request
    (64, 32, 8, 130, 128, [130] * 32 + list(range(1, 33))),  # big batch: one split, no reduction
]
CUDA_DECODE_OPTIONS = [dict(softcap=5.0), dict(window=9), dict(window=1), dict(scale=0.3, softcap=20.0, window=400)]
CUDA_CASCADE_CASES = [
    # b, hq, hkv, t, length, dh, suffix_lens
    (3, 4, 4, 40, 6, 64, [6, 0, 1]),  # empty and length-1 suffixes
    (5, 8, 2, 333, 9, 128, [9, 3, 0, 8, 1]),  # GQA 4
    (2, 8, 1, 17, 3, 256, [2, 3]),  # GQA 8, Dh 256
    (2, 4, 2, 0, 4, 64, [4, 1]),  # no shared prefix
    (2, 4, 2, 21, 0, 64, [0, 0]),  # no suffix at all
    (32, 32, 8, 2049, 70, 128, [i * 2 for i in range(32)]),  # 128 rows per KV head: two row tiles
    (3, 8, 2, 5, 3, 128, [3, 2, 1]),  # 12 rows: the 2x2 warp layout
]
CUDA_CASCADE_OPTIONS = [dict(softcap=7.0), dict(window=5), dict(window=300, softcap=3.0)]


def decode_inputs(device, b, hq, hkv, tmax, dh, lens, dtype, strided=False):
    """(q, k, v, lens int32) of a decode case, seeded by its sizes."""
    torch.manual_seed(b * 7 + hq + tmax + dh)
    q = rand(b, hq, dh, dtype=dtype, device=device, strided=strided)
    k = rand(b, hkv, tmax, dh, dtype=dtype, device=device, strided=strided)
    v = rand(b, hkv, tmax, dh, dtype=dtype, device=device, strided=strided)
    return q, k, v, torch.tensor(lens, device=device, dtype=torch.int32)


def cascade_inputs(device, b, hq, hkv, t, length, dh, suffix_lens, dtype, strided=False):
    """(q, k_shared, v_shared, k_suffix, v_suffix, suffix_lens int64) of a cascade case."""
    torch.manual_seed(b * 5 + hq + t + length + dh)
    q = rand(b, hq, dh, dtype=dtype, device=device, strided=strided)
    ks = rand(hkv, t, dh, dtype=dtype, device=device, strided=strided)
    vs = rand(hkv, t, dh, dtype=dtype, device=device, strided=strided)
    kx = rand(b, hkv, length, dh, dtype=dtype, device=device, strided=strided)
    vx = rand(b, hkv, length, dh, dtype=dtype, device=device, strided=strided)
    return q, ks, vs, kx, vx, torch.tensor(suffix_lens, device=device, dtype=torch.int64)


def check_nonfinite(out, lse, ref_out, ref_lse, torch_out, torch_lse, dtype):
    """check() where the reference may hold NaN / +-inf: those entries must match exactly (NaN for
    NaN, the same infinity), the rest is held to check()'s tolerance."""
    bad_o, bad_l = ~torch.isfinite(ref_out), torch.isnan(ref_lse) | (ref_lse == float("inf"))
    o64, l64 = out.double(), lse.double()
    assert torch.equal(torch.isnan(o64), torch.isnan(ref_out)), "o: NaN pattern differs from the reference"
    assert torch.equal(o64[bad_o & ~torch.isnan(ref_out)], ref_out[bad_o & ~torch.isnan(ref_out)]), "o: inf differs"
    assert torch.equal(torch.isnan(l64), torch.isnan(ref_lse)), "lse: NaN pattern differs from the reference"
    assert torch.equal(l64 == float("inf"), ref_lse == float("inf")), "lse: +inf pattern differs"
    rows = ~(bad_l | bad_o.any(-1))
    if rows.any():
        check(out[rows], lse[rows], ref_out[rows], ref_lse[rows], torch_out[rows], torch_lse[rows], dtype)


def run_decode(backend, device, b, hq, hkv, tmax, dh, lens, dtype, strided=False, **opts):
    q, k, v, lens = decode_inputs(device, b, hq, hkv, tmax, dh, lens, dtype, strided)
    out, lse = ops.decode_attention(q, k, v, lens, return_lse=True, backend=backend, **opts)
    ref_out, ref_lse = reference.decode_attention(
        q.float(), k.float(), v.float(), lens, return_lse=True, **opts
    )
    t_out, t_lse = torch_impl.decode_attention(q, k, v, lens, return_lse=True, **opts)
    assert out.shape == q.shape and out.dtype == dtype and lse.dtype == torch.float32
    check(out, lse, ref_out, ref_lse, t_out, t_lse, dtype)


def run_cascade(backend, device, b, hq, hkv, t, length, dh, suffix_lens, dtype, strided=False, **opts):
    q, ks, vs, kx, vx, sl = cascade_inputs(device, b, hq, hkv, t, length, dh, suffix_lens, dtype, strided)
    out, lse = ops.cascade_decode(q, ks, vs, kx, vx, sl, return_lse=True, backend=backend, **opts)
    f = [x.float() for x in (q, ks, vs, kx, vx)]
    ref_out, ref_lse = reference.cascade_decode(*f, sl, return_lse=True, **opts)
    t_out, t_lse = torch_impl.cascade_decode(q, ks, vs, kx, vx, sl, return_lse=True, **opts)
    check(out, lse, ref_out, ref_lse, t_out, t_lse, dtype)


def merge_inputs(device, dh, dtype):
    """(o_a, lse_a, o_b, lse_b, o_b as a strided view): -inf lse entries (one side / both sides empty)."""
    torch.manual_seed(2)
    o_a = torch.randn(3, 5, dh, device=device).to(dtype)
    o_b = torch.randn(3, 5, dh, device=device).to(dtype)
    lse_a, lse_b = torch.randn(3, 5, device=device), torch.randn(3, 5, device=device)
    lse_a[0, 0] = float("-inf")
    lse_a[1, 1] = lse_b[1, 1] = float("-inf")
    return o_a, lse_a, o_b, lse_b, o_b.transpose(0, 1).contiguous().transpose(0, 1)


def merge_states_case(backend, device, dh, dtype):
    """merge_states with -inf lse entries (one side / both sides empty) and a strided o_b."""
    o_a, lse_a, o_b, lse_b, o_b_strided = merge_inputs(device, dh, dtype)
    out, lse = ops.merge_states(o_a, lse_a, o_b_strided, lse_b, backend=backend)
    ref_out, ref_lse = reference.merge_states(o_a.float(), lse_a, o_b.float(), lse_b)
    t_out, t_lse = reference.merge_states(o_a, lse_a, o_b, lse_b)
    check(out, lse, ref_out, ref_lse, t_out, t_lse, dtype)
    return out, lse

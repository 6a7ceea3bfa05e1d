"""Regression tests of the CUDA C++ defects issue 21 found (each fails on the code before its fix).

1. the non-finite-key rule (reference.finite_keys) in the score loop;
2. a NaN partial state dropped by the state merge (cascade);
3. the split-KV workspace not monotone in the key count;
4. merge_states with an lse of +inf;
5. num_splits not clamped to gridDim.y's 65535.
"""

from __future__ import annotations

import emu_ops
import pytest
import torch
from decode_cases import check_nonfinite, decode_inputs
from emu_checks import FWD, REV, SCHEDULES, check_cascade_emu, check_decode_emu

from cacheaug_engine.ops import reference

pytestmark = pytest.mark.cuda_emu


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(
    "where, value, opts",
    [("k", float("inf"), {}), ("k", float("-inf"), {}), ("k", float("inf"), dict(softcap=5.0)),
     ("v", float("inf"), {}), ("v", float("nan"), {}), ("k", float("nan"), dict(window=10))],
    ids=["k+inf", "k-inf", "k+inf-softcap", "v+inf", "v-nan", "k-nan-window"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_visible_nonfinite_key_gives_nan(emu_libs, dtype, where, value, opts, schedule):
    """One element of a visible key's k or v is +-Inf / NaN: every row that sees the key is NaN
    (o and lse), the other rows are untouched. Before the fix an Inf scored +-inf (o = that
    key's v, lse +inf, or the key dropped), softcap made it a finite +-c, and Inf/NaN in v left
    lse finite."""
    q, k, v, lens = decode_inputs("cpu", 3, 8, 2, 90, 64, [90, 40, 12], dtype)
    k, v = k.clone(), v.clone()
    x = k if where == "k" else v
    x[0, 1, 30, 17] = value  # request 0 sees key 30 (KV head 1: query heads 4..7)
    x[1, 0, 5, 3] = value  # request 1 sees key 5 (KV head 0: query heads 0..3)
    x[2, 1, 20, 0] = value  # past request 2's length 12: never seen
    check_decode_emu(q, k, v, lens, schedule, **opts)
    o, lse, _ = emu_ops.run(emu_ops.decode_call(q, k, v, lens, schedule=schedule, **opts))
    seen = "window" not in opts  # window 10: request 0 sees keys 80..89, request 1 keys 30..39
    assert bool(torch.isnan(lse[0, 4:]).all()) == seen and bool(torch.isnan(lse[1, :4]).all()) == seen
    assert torch.isfinite(lse[1, 4:]).all() and torch.isfinite(lse[2]).all() and torch.isfinite(lse[0, :4]).all()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cascade_nan_state_is_not_dropped(emu_libs, schedule):
    """T 64, L 8, window 8, suffix lens [7, 0], NaN in shared key 63: both requests see key 63
    (positions 63..70 and 56..63), so both are NaN. Before the fix the state merge dropped the
    NaN partial state (m = -inf, l = NaN) and request 0 got a finite o and lse."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 64)
    ks, vs = torch.randn(2, 64, 64), torch.randn(2, 64, 64)
    kx, vx = torch.randn(2, 2, 8, 64), torch.randn(2, 2, 8, 64)
    ks[:, 63] = float("nan")
    sl = torch.tensor([7, 0])
    check_cascade_emu(q, ks, vs, kx, vx, sl, schedule, window=8)
    _, lse, _ = emu_ops.run(emu_ops.cascade_call(q, ks, vs, kx, vx, sl, window=8, schedule=schedule))
    assert torch.isnan(lse).all()


def _decode_ws(b, hq, hkv, t, dh, num_splits=0):
    return emu_ops.fast_lib().workspace("decode", dict(B=b, Hq=hq, Hkv=hkv, Tmax=t, Dh=dh, num_splits=num_splits))


@pytest.mark.parametrize("b, hq, hkv", [(1, 8, 8), (1, 32, 8), (2, 8, 2), (3, 16, 1)])
def test_workspace_is_monotone_in_the_key_count(emu_libs, b, hq, hkv):
    """cuda_ops.workspace sizes the split-KV workspace once for kv_capacity keys: no shorter
    run may need more (132 SMs, 8 CTAs: 8448 keys needed 33 splits' worth, 8449 only 27)."""
    prev = 0
    for t in range(0, 20001, 7):
        nbytes = _decode_ws(b, hq, hkv, t, 128)[1]
        assert nbytes >= prev, f"Tmax {t} needs {nbytes} bytes, Tmax {t - 7} needed {prev}"
        prev = nbytes
    lib = emu_ops.fast_lib()
    prev = 0
    for length in range(0, 5000, 3):
        a = dict(B=b, Hq=hq, Hkv=hkv, T=1000, L=length, Dh=128, num_splits=0)
        nbytes = lib.workspace("cascade", a)[1]
        assert nbytes >= prev, f"suffix capacity {length} needs {nbytes} bytes, {length - 3} needed {prev}"
        prev = nbytes


def test_workspace_planned_for_a_capacity_fits_a_shorter_run(emu_libs):
    """A plan for kv_capacity 8449 runs 8448 keys (it failed: "workspace too small")."""
    assert _decode_ws(1, 8, 8, 8448, 64)[0] == (33,)  # the case of the issue: 8 CTAs per split
    cap_bytes = _decode_ws(1, 8, 8, 8449, 64)[1]
    q, k, v, lens = decode_inputs("cpu", 1, 8, 8, 8448, 64, [8448], torch.bfloat16)
    call, o, lse = emu_ops.decode_call(q, k, v, lens, schedule=REV, workspace_bytes=cap_bytes)
    o, lse, res = emu_ops.run((call, o, lse))
    ref_o, ref_l = reference.decode_attention(q.double(), k.double(), v.double(), lens, return_lse=True)
    check_nonfinite(o, lse, ref_o, ref_l, *reference.decode_attention(q, k, v, lens, return_lse=True), q.dtype)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_merge_with_plus_inf_lse(emu_libs, dtype, schedule):
    """reference.merge_states: an lse of +inf gives lse +inf and o NaN (it gave lse NaN); a NaN
    lse stays NaN; -inf is an empty part."""
    torch.manual_seed(1)
    o_a, o_b = torch.randn(6, 64).to(dtype), torch.randn(6, 64).to(dtype)
    inf, nan = float("inf"), float("nan")
    lse_a = torch.tensor([inf, inf, inf, 0.5, nan, -inf])
    lse_b = torch.tensor([1.0, -inf, inf, inf, inf, inf])
    o, lse, _ = emu_ops.run(emu_ops.merge_call(o_a, lse_a, o_b, lse_b, schedule=schedule))
    ref_o, ref_l = reference.merge_states(o_a.double(), lse_a.double(), o_b.double(), lse_b.double())
    assert torch.equal(torch.isnan(lse), torch.isnan(ref_l)) and torch.equal(lse == inf, ref_l == inf), (lse, ref_l)
    assert torch.equal(torch.isnan(o), torch.isnan(ref_o))


def test_num_splits_clamped_to_grid_y(emu_libs):
    """A requested split count past gridDim.y's 65535 is clamped (the launch would fail)."""
    splits, nbytes = _decode_ws(1, 2, 1, 70_000, 64, num_splits=70_000)
    assert splits == (35_000,)  # 65535 asked for: chunks of 2 keys (it gave 70000 splits of 1 key)
    assert nbytes >= 2 * splits[0] * 65 * 4
    q, k, v, lens = decode_inputs("cpu", 1, 2, 1, 70, 64, [70], torch.float32)
    check_decode_emu(q, k, v, lens, FWD, num_splits=70_000)  # more splits than keys: one key each

"""The CUDA C++ kernels of csrc/ run on the CPU under the emulator (tests/cuda_emu/README.md).

Every call goes through the real C API (csrc/cacheaug.h) of a g++ build of csrc/decode.cu, and
is compared with the torch reference in float64 (tolerance: decode_cases.check, i.e. at most 2x
the torch backend's error at the same dtype plus a floor; NaN / inf entries must match exactly).
Cases: the GPU suite's lists (decode_cases.CUDA_*, tests/test_decode_cuda.py), the decode and
cascade poison grids (poison_cases) at the cuda head dim, and odd shapes, strided, misaligned
and int64 / strided-lens layouts for every dtype and head dim the C API takes. Each runs in two
schedules: threads forward with cp.async held back until the wait, and threads reversed with
cp.async done at once (cheap-and-heavy cases alternate between them). A batch runs on the
ASan + UBSan build in a subprocess.
"""

from __future__ import annotations

import emu_ops
import pytest
import torch
from decode_cases import (
    CUDA_CASCADE_CASES,
    CUDA_CASCADE_OPTIONS,
    CUDA_DECODE_CASES,
    CUDA_DECODE_OPTIONS,
    cascade_inputs,
    check_nonfinite,
    decode_inputs,
    merge_inputs,
    rand,
)
from emu_checks import (
    FWD,
    REV,
    SCHEDULES,
    cascade_emu,
    cascade_reference64,
    check_cascade_emu,
    check_decode_emu,
    decode_emu,
    decode_reference64,
)
from poison_cases import CASCADE_GRID, CUDA_DH, DECODE_GRID, check_cascade, check_decode

from cacheaug_engine.ops import reference, torch_impl

pytestmark = pytest.mark.cuda_emu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ONE_SCHEDULE = {torch.float32: FWD, torch.bfloat16: REV, torch.float16: FWD}  # heavy cases: one each
HEAVY_DECODE = {1, 5}  # CUDA_DECODE_CASES indices: Tmax 3001 with splits, batch 64
HEAVY_CASCADE = {5}  # B 32 over 2049 shared keys (~6 s of CPU each: bf16 only)


def _id(x) -> str:
    return str(x).replace("torch.", "")


def _grid(cases, heavy, heavy_dtypes=tuple(DTYPES)):
    """Every case x dtype x schedule; a heavy case in one schedule per dtype, for heavy_dtypes only."""
    return [
        pytest.param(i, dtype, sched, id=f"{i}-{_id(dtype)}-{sched}")
        for i in range(len(cases)) for dtype in DTYPES for sched in SCHEDULES
        if i not in heavy or (sched == ONE_SCHEDULE[dtype] and dtype in heavy_dtypes)
    ]


# ----------------------------------------------------------------------------- the GPU suite's cases


@pytest.mark.parametrize("idx, dtype, schedule", _grid(CUDA_DECODE_CASES, HEAVY_DECODE))
def test_decode_matches_reference(emu_libs, idx, dtype, schedule):
    case = CUDA_DECODE_CASES[idx]
    res = check_decode_emu(*decode_inputs("cpu", *case, dtype=dtype), schedule)
    if idx == 1:
        assert res["splits"][0] > 1 and "reduce_kernel" in res["log"], "the split-KV path was not taken"


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_id)
@pytest.mark.parametrize("opts", CUDA_DECODE_OPTIONS, ids=str)
def test_decode_options(emu_libs, opts, dtype, schedule):
    check_decode_emu(*decode_inputs("cpu", 3, 8, 2, 1067, 128, [1067, 2, 500], dtype), schedule, **opts)


@pytest.mark.parametrize("dh", [64, 128, 256])
def test_decode_strided_views(emu_libs, dh):
    check_decode_emu(*decode_inputs("cpu", 2, 4, 2, 333, dh, [333, 20], torch.float16, strided=True), FWD,
                     window=120)
    check_decode_emu(*decode_inputs("cpu", 2, 8, 2, 333, dh, [1, 333], torch.bfloat16, strided=True), REV)


def test_decode_long_cache_one_request(emu_libs):
    res = check_decode_emu(*decode_inputs("cpu", 1, 32, 8, 32768, 128, [32768], torch.bfloat16), REV)
    assert res["splits"][0] > 1 and "reduce_kernel" in res["log"]


@pytest.mark.parametrize("idx, dtype, schedule", _grid(CUDA_CASCADE_CASES, HEAVY_CASCADE, (torch.bfloat16,)))
def test_cascade_matches_reference(emu_libs, idx, dtype, schedule):
    check_cascade_emu(*cascade_inputs("cpu", *CUDA_CASCADE_CASES[idx], dtype=dtype), schedule)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("opts", CUDA_CASCADE_OPTIONS, ids=str)
def test_cascade_options(emu_libs, opts, schedule):
    inputs = cascade_inputs("cpu", 9, 8, 2, 1040, 7, 128, [7, 0, 3, 1, 2, 4, 5, 6, 7], torch.bfloat16)
    check_cascade_emu(*inputs, schedule, **opts)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cascade_strided_views(emu_libs, schedule):
    check_cascade_emu(*cascade_inputs("cpu", 3, 4, 2, 290, 5, 128, [5, 2, 0], torch.bfloat16, strided=True),
                      schedule)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_merge_states(emu_libs, dtype, schedule):
    """-inf lse entries (one side / both empty); o_b with padded rows and element stride 2."""
    o_a, lse_a, o_b, lse_b, _ = merge_inputs("cpu", 128, dtype)
    dh = o_a.shape[-1]
    o_b_rows = torch.full((15, 2 * dh + 1), float("nan"), dtype=dtype)[:, 1 : 1 + 2 * dh : 2]
    o_b_rows.copy_(o_b.reshape(-1, dh))
    call = emu_ops.merge_call(o_a.reshape(-1, dh), lse_a.reshape(-1), o_b_rows, lse_b.reshape(-1), schedule=schedule)
    o, lse, _ = emu_ops.run(call)
    ref_o, ref_l = reference.merge_states(o_a.double(), lse_a.double(), o_b.double(), lse_b.double())
    t_o, t_l = reference.merge_states(o_a, lse_a, o_b, lse_b)
    check_nonfinite(o.view(o_a.shape), lse.view(lse_a.shape), ref_o, ref_l, t_o, t_l, dtype)


# ----------------------------------------------------------------------------- poison grids at the cuda head dim


def _decode_runner(schedule):
    def run(q, k, v, lens, window):
        o, lse, _ = decode_emu(q, k, v, lens, schedule, window=window)
        return o, lse

    return run


def _cascade_runner(schedule):
    def run(q, ks, vs, kx, vx, sl, window):
        o, lse, _ = cascade_emu(q, ks, vs, kx, vx, sl, schedule, window=window)
        return o, lse

    return run


@pytest.mark.parametrize("klass, value, which", DECODE_GRID)
def test_poison_decode(emu_libs, klass, value, which):
    sched = SCHEDULES[DECODE_GRID.index((klass, value, which)) % 2]
    check_decode(_decode_runner(sched), "cpu", klass, value, which, f"emulated cuda decode ({sched})", dh=CUDA_DH)


@pytest.mark.parametrize("klass, value, which", CASCADE_GRID)
def test_poison_cascade(emu_libs, klass, value, which):
    sched = SCHEDULES[CASCADE_GRID.index((klass, value, which)) % 2]
    check_cascade(_cascade_runner(sched), "cpu", klass, value, which, f"emulated cuda cascade ({sched})",
                  dh=CUDA_DH)


# ----------------------------------------------------------------------------- odd shapes and layouts


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dh", [64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_decode_every_dtype_and_head_dim(emu_libs, dtype, dh, schedule):
    """GQA 3, lens int64 read through a stride of 2, forced 3 splits (the reduce kernel)."""
    q, k, v, _ = decode_inputs("cpu", 3, 6, 2, 70, dh, [0, 0, 0], dtype)
    lens = torch.tensor([70, 9, 33, 0, 0, 0], dtype=torch.int64)[::2]  # a strided view: [70, 33, 0]
    res = check_decode_emu(q, k, v, lens, schedule, num_splits=3)
    assert res["splits"] == (3,)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_decode_misaligned_and_strided_outputs(emu_libs, dtype, schedule):
    """Inputs one element into their storage (no 16-byte path), o with padded rows one element
    in, lse strided; G 12 (a full and a partial row tile)."""
    b, hq, hkv, t, dh = 2, 12, 1, 150, 64

    def shifted(*shape):
        base = torch.randn(1 + torch.Size(shape).numel()).to(dtype)
        return base[1:].view(*shape)

    q, k, v = shifted(b, hq, dh), shifted(b, hkv, t, dh), shifted(b, hkv, t, dh)
    lens = torch.tensor([150, 77], dtype=torch.int32)
    o = emu_ops.empty_like_layout((b, hq, dh), dtype, strided=True, misalign=1)
    lse = emu_ops.empty_like_layout((b, hq), torch.float32, strided=True)
    check_decode_emu(q, k, v, lens, schedule, o=o, lse=lse, softcap=4.0)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 64])
def test_decode_forced_splits(emu_libs, num_splits):
    res = check_decode_emu(*decode_inputs("cpu", 2, 4, 2, 300, 128, [300, 41], torch.float16),
                           SCHEDULES[num_splits % 2], num_splits=num_splits, window=100)
    assert res["splits"][0] == min(num_splits, 300) or num_splits == 64


def test_decode_no_keys_at_all(emu_libs):
    q, k, v, lens = decode_inputs("cpu", 2, 4, 2, 0, 64, [0, 0], torch.float32)
    o, lse, _ = decode_emu(q, k, v, lens, FWD)
    assert torch.equal(o, torch.zeros_like(o)) and torch.all(lse == float("-inf"))


@pytest.mark.parametrize("b, hq, hkv", [(4, 4, 1), (5, 12, 2), (20, 8, 4)], ids=["rows8", "rows30", "rows40"])
def test_cascade_warp_layouts(emu_libs, b, hq, hkv):
    """Shared-prefix CTAs of 8 / 16-32 / 64 rows (1x4, 4x1 and 8x1 warp layouts), int32 suffix
    lengths through a stride, softcap and a window reaching into the shared prefix."""
    q, ks, vs, kx, vx, _ = cascade_inputs("cpu", b, hq, hkv, 130, 9, 64, [0] * b, torch.float32)
    sl = torch.tensor([(3 * i) % 10 for i in range(2 * b)], dtype=torch.int32)[::2]
    check_cascade_emu(q, ks, vs, kx, vx, sl, REV if b % 2 else FWD, softcap=6.0, window=20)


@pytest.mark.parametrize("opts", [{}, dict(softcap=3.0, window=7), dict(window=1, scale=0.2)], ids=str)
def test_reference64_matches_reference(opts):
    """The batched float64 reference the emulated checks use is reference.py's cascade_decode and
    decode_attention (NaN / Inf keys, visible or not, empty rows, GQA)."""
    torch.manual_seed(3)
    q, ks, vs = torch.randn(4, 6, 32), torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    kx, vx = torch.randn(4, 2, 5, 32), torch.randn(4, 2, 5, 32)
    ks[1, 8, 3], vs[0, 2, 0], kx[1, 0, 1, 5], vx[2, 1, 4, 1] = float("inf"), float("nan"), float("-inf"), float("nan")
    sl = torch.tensor([5, 0, 2, 4])
    d = [x.double() for x in (q, ks, vs, kx, vx)]
    got, want = cascade_reference64(q, ks, vs, kx, vx, sl, **opts), reference.cascade_decode(*d, sl, return_lse=True,
                                                                                             **opts)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-12, atol=1e-12)
    lens = torch.tensor([5, 0, 2, 4])
    got = decode_reference64(q, kx, vx, lens, **opts)
    want = reference.decode_attention(q.double(), kx.double(), vx.double(), lens, return_lse=True, **opts)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-12, atol=1e-12)


def test_strided_inputs_are_really_strided():
    """decode_cases.rand(strided=True) keeps stride 2 along Dh (the element-by-element load
    paths); it used to make the view contiguous again."""
    x = rand(2, 3, 5, 8, dtype=torch.float16, device="cpu", strided=True)
    assert x.stride(-1) == 2 and x.shape == (2, 3, 5, 8)
    assert x.stride(1) < x.stride(2)  # the two leading dims stored swapped


# ----------------------------------------------------------------------------- the sanitizer build


def _san_cases():
    """(name, call, o, lse, reference (o, lse), baseline (o, lse), dtype): one call per kernel path."""
    out = []
    for dtype in DTYPES:
        for dh, strided, splits in ((64, False, 0), (128, True, 3), (256, False, 2)):
            q, k, v, lens = decode_inputs("cpu", 2, 8, 2, 90, dh, [90, 13], dtype, strided=strided)
            call, o, lse = emu_ops.decode_call(q, k, v, lens, num_splits=splits, window=50,
                                               schedule=SCHEDULES[dh % 3 % 2])
            ref = reference.decode_attention(q.double(), k.double(), v.double(), lens, window=50, return_lse=True)
            base = torch_impl.decode_attention(q, k, v, lens, window=50, return_lse=True)
            out.append((f"decode {_id(dtype)} dh{dh} strided={strided}", call, o, lse, ref, base, dtype))
        inputs = cascade_inputs("cpu", 5, 8, 2, 70, 6, 128, [6, 0, 3, 1, 2], dtype)
        call, o, lse = emu_ops.cascade_call(*inputs, softcap=5.0, schedule=FWD)
        d = [x.double() for x in inputs[:5]]
        ref = reference.cascade_decode(*d, inputs[5], softcap=5.0, return_lse=True)
        base = torch_impl.cascade_decode(*inputs, softcap=5.0, return_lse=True)
        out.append((f"cascade {_id(dtype)}", call, o, lse, ref, base, dtype))
        o_a, lse_a, o_b, lse_b, _ = merge_inputs("cpu", 64, dtype)
        call, o, lse = emu_ops.merge_call(o_a.reshape(-1, 64), lse_a.reshape(-1), o_b.reshape(-1, 64),
                                          lse_b.reshape(-1), schedule=REV)
        ref = [x.reshape(-1, 64) if x.dim() == 3 else x.reshape(-1) for x in
               reference.merge_states(o_a.double(), lse_a.double(), o_b.double(), lse_b.double())]
        base = [x.reshape(-1, 64) if x.dim() == 3 else x.reshape(-1) for x in
                reference.merge_states(o_a, lse_a, o_b, lse_b)]
        out.append((f"merge {_id(dtype)}", call, o, lse, ref, base, dtype))
    return out


def test_sanitizer_build(emu_libs):
    """Decode (fp32/bf16/fp16 x Dh 64/128/256, strided, split), cascade and merge on the
    ASan + UBSan build: no report (a report aborts the subprocess), and correct results."""
    cases = _san_cases()
    results = emu_ops.run_san([c[1] for c in cases])
    for (name, _, o, lse, ref, base, dtype), res in zip(cases, results, strict=True):
        out_o, out_l = emu_ops.outputs(res, o, lse)
        try:
            check_nonfinite(out_o, out_l, *ref, *base, dtype)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc

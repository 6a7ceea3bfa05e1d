"""Invisible keys never reach an output (issue 15 item 1; contract: reference.finite_keys).

NaN, +-Inf and the dtype's largest value are written into every class of key position a
query cannot see - prefix entries j >= p_k, other blocks' keys, future keys of its own
block (causal), keys beyond the window, cache entries past lens (decode), suffix entries
past suffix_lens and shared entries beyond the window (cascade). Every row that sees no
poisoned key must give exactly the clean run's output and lse, forward and backward (dq;
and dk/dv of every key seen only by such rows). Backends: the reference, torch, flex
(forward: FlexAttention has no CPU backward) and Triton under the interpreter here; the
CUDA decode backend in the `cuda`-marked tests. Poisoned query rows and output gradients
(q, dO, dlse) are checked on the fused Triton backward, whose tiles mix rows that see a
key with rows that do not.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from poison_cases import (  # noqa: E402
    CASCADE_GRID,
    CUDA_DH,
    DECODE_GRID,
    assert_same,
    check_cascade,
    check_decode,
    poison_value,
    put,
    segment_visibility,
    split_keys,
    taint,
)

from cacheaug_engine import ops
from cacheaug_engine.ops import reference  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
VALUES = ["nan", "inf", "-inf", "huge"]

# B=2, Hq=4, Hkv=2 (GQA 2), N=3 blocks of S=5, T=16, Dh=16: the interpreter's 16x16 tiles
# span block boundaries (packed rows), so every tile mixes rows that see a key with rows
# that do not.
B, HQ, HKV, N, S, T, DH = 2, 4, 2, 3, 5, 16, 16
LENS = [[3, 9, 16], [0, 7, 12]]


def _segment_inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)  # noqa: E731
    q, k, v = rnd(B, HQ, N * S, DH), rnd(B, HKV, N * S, DH), rnd(B, HKV, N * S, DH)
    kp, vp = rnd(B, HKV, T, DH), rnd(B, HKV, T, DH)
    go, gl = rnd(B, HQ, N * S, DH).float(), rnd(B, HQ, N * S).float()
    return (q, k, v, kp, vp, torch.tensor(LENS, dtype=torch.int32, device=DEVICE)), go, gl


def _run_segment(backend, inputs, opts, go, gl, backward=True):
    """(o, lse, dq, dk, dv) of one backend; grads of <o, go> + <lse, gl>."""
    q, k, v, kp, vp, pl = inputs
    q, k, v = (x.detach().clone().requires_grad_(backward) for x in (q, k, v))
    if backend == "reference":
        o, lse = reference.segment_attention(q, k, v, kp, vp, pl, return_lse=True, **opts)
    elif backend == "torch-nolse":  # the torch backend's path without lse (plain softmax)
        o = ops.segment_attention(q, k, v, kp, vp, pl, backend="torch", **opts)
        lse, gl = torch.zeros(o.shape[:3]), torch.zeros(o.shape[:3])
    else:
        o, lse = ops.segment_attention(q, k, v, kp, vp, pl, return_lse=True, backend=backend, **opts)
    if not backward:
        return [o.detach(), lse.detach()]
    grads = torch.autograd.grad((o.float() * go).sum() + (lse * gl).sum(), (q, k, v))
    return [o.detach(), lse.detach(), *grads]


# Each class: (options, target rows [B, N*S] -> the rows the poison must not reach, region of
# key positions [B, T + N*S] to poison). Poison = region minus every key a target row sees.
def _rows(pred):
    r = torch.arange(N * S)
    return pred(r // S, r % S).expand(B, N * S)


def _keys(prefix: bool, blocks: bool):
    return torch.cat([torch.full((B, T), prefix), torch.full((B, N * S), blocks)], 1)


SEGMENT_CLASSES = {
    # prefix entries j >= p_k of block 0 (j < p_1, p_2 of later blocks included)
    "prefix_past_p": (dict(), _rows(lambda blk, i: blk == 0), _keys(True, False)),
    "prefix_past_p_full_blocks": (dict(causal=False), _rows(lambda blk, i: blk == 0), _keys(True, False)),
    # the keys of blocks 0 and 2, for the rows of block 1
    "other_blocks": (dict(), _rows(lambda blk, i: blk == 1), _keys(False, True)),
    "other_blocks_softcap": (dict(causal=False, softcap=3.0), _rows(lambda blk, i: blk == 1), _keys(False, True)),
    # future keys of the own block: keys i' >= 2 for rows i < 2, in every block
    "future_in_block": (dict(), _rows(lambda blk, i: i < 2), _keys(False, True)),
    # beyond the window: the last row of each block sees only positions > p + S - 1 - window
    "beyond_window": (dict(window=4), _rows(lambda blk, i: i == S - 1), _keys(True, True)),
    # memory no row sees at all: prefix entries past every p_k (T = 16 > p for batch 1)
    "unused_prefix": (dict(), _rows(lambda blk, i: blk >= 0), _keys(True, False)),
}


def _segment_poison(name, value, which, dtype=torch.float32):
    """(clean inputs, poisoned inputs, opts, tainted rows, tainted block keys, go, gl)."""
    opts, target, region = SEGMENT_CLASSES[name]
    opts = dict(block_len=S, **opts)
    inputs, go, gl = _segment_inputs(dtype)
    vis = segment_visibility(inputs[5], T, S, opts.get("causal", True), opts.get("window"))
    seen_by_target = (vis & target[:, :, None]).any(1)
    poison = region & ~seen_by_target
    assert poison.any(), name
    pp, pb = split_keys(poison.to(DEVICE), T)
    val = poison_value(value, dtype)
    q, k, v, kp, vp, pl = inputs
    if "k" in which:
        k, kp = put(k, pb, val), put(kp, pp, val)
    if "v" in which:
        v, vp = put(v, pb, val), put(vp, pp, val)
    rows, keys = taint(vis, poison)
    assert not (rows & target).any()
    return inputs, (q, k, v, kp, vp, pl), opts, rows.to(DEVICE), keys[:, T:].to(DEVICE), go, gl


def _check_segment(backend, name, value, which, backward=True, exact=True):
    clean_in, poison_in, opts, rows, keys, go, gl = _segment_poison(name, value, which)
    clean = _run_segment(backend, clean_in, opts, go, gl, backward)
    dirty = _run_segment(backend, poison_in, opts, go, gl, backward)
    for idx, what in enumerate(("o", "lse", "dq", "dk", "dv")[: len(clean)]):
        sel = ~rows if idx < 3 else ~keys
        if idx >= 3 and not sel.any():  # e.g. future keys: every key of the block is seen by a poisoned row
            continue
        got, want = dirty[idx], clean[idx]
        if idx == 1:
            got, want = got[..., None], want[..., None]
        assert_same(got, want, sel, f"{backend} {name} {which}={value} {what}", exact)


# k alone, v alone and both for NaN; both for the other values (keeps the CPU suite short)
VALUE_WHICH = [("nan", "k"), ("nan", "v"), ("nan", "kv"), ("inf", "kv"), ("-inf", "kv"), ("huge", "kv")]


@pytest.mark.parametrize("value, which", VALUE_WHICH)
@pytest.mark.parametrize("name", list(SEGMENT_CLASSES))
@pytest.mark.parametrize("backend", ["reference", "torch", "torch-nolse"])
def test_segment_torch_backends(backend, name, value, which):
    _check_segment(backend, name, value, which)


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("name", list(SEGMENT_CLASSES))
def test_segment_flex_forward(name, value):
    _check_segment("flex", name, value, "kv", backward=False)


TRITON_GRID = [(name, value) for name in SEGMENT_CLASSES for value in ("nan", "inf")] + [
    ("other_blocks", "-inf"), ("future_in_block", "huge"), ("beyond_window", "-inf"),
]


@pytest.mark.parametrize("name, value", TRITON_GRID)
def test_segment_triton(name, value):
    pytest.importorskip("triton")
    _check_segment("triton", name, value, "kv")


@pytest.mark.parametrize("name", ["other_blocks", "future_in_block"])
@pytest.mark.parametrize("which", ["k", "v"])
def test_segment_triton_k_or_v_alone(name, which):
    pytest.importorskip("triton")
    _check_segment("triton", name, "nan", which)


# ----------------------------------------------------------------------------- poisoned rows


@pytest.mark.parametrize("what", ["q", "do", "dlse"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_segment_triton_poisoned_rows(what, value):
    """A query row's q, output gradient or lse gradient never reaches the dk/dv of keys it cannot
    see, nor other rows: rows 0 and 3 of block 1 are poisoned (keys 1..4 / 4 of block 1 are
    seen by rows of the same tile that are clean)."""
    pytest.importorskip("triton")
    inputs, go, gl = _segment_inputs()
    opts = dict(block_len=S)
    vis = segment_visibility(inputs[5], T, S, True, None)
    bad = torch.zeros(B, N * S, dtype=torch.bool)
    bad[:, S + 0] = bad[:, S + 3] = True
    val = float(value)
    q, k, v, kp, vp, pl = inputs
    if what == "q":
        q = q.clone()
        q[bad[:, None, :, None].expand_as(q).to(DEVICE)] = val
    elif what == "do":
        go = go.clone()
        go[bad[:, None, :, None].expand_as(go).to(DEVICE)] = val
    clean = _run_segment("triton", inputs, opts, *_segment_inputs()[1:])
    gl_dirty = gl.clone()
    if what == "dlse":
        gl_dirty[bad[:, None, :].expand_as(gl).to(DEVICE)] = val
    dirty = _run_segment("triton", (q, k, v, kp, vp, pl), opts, go, gl_dirty)
    rows, keys = taint(vis, torch.zeros(B, T + N * S, dtype=torch.bool), bad)
    keys = keys[:, T:]
    assert (~keys).view(B, N, S)[:, 1].any(), "no key of the poisoned block stays clean"
    first = 0 if what == "q" else 2  # a poisoned dO / dlse leaves o and lse alone
    for idx in range(first, 5):
        sel = (~rows if idx < 3 else ~keys).to(DEVICE)
        got, want = dirty[idx], clean[idx]
        if idx == 1:
            got, want = got[..., None], want[..., None]
        assert_same(got, want, sel, f"triton poisoned {what} rows: {('o', 'lse', 'dq', 'dk', 'dv')[idx]}", True)


# ----------------------------------------------------------------------------- a visible poison still shows


@pytest.mark.parametrize("backend", ["reference", "torch", "flex", "triton"])
def test_visible_poison_is_not_hidden(backend):
    """Masking must not turn a NaN a row really sees into a finite number."""
    if backend == "triton":
        pytest.importorskip("triton")
    inputs, go, gl = _segment_inputs()
    q, k, v, kp, vp, pl = inputs
    v = v.clone()
    v[:, :, S + 1] = float("nan")  # key 1 of block 1: rows 1..4 of block 1 see it
    o, lse = _run_segment(backend, (q, k, v, kp, vp, pl), dict(block_len=S), go, gl, backward=False)
    assert not torch.isfinite(o[:, :, S + 1 : 2 * S]).any()
    assert torch.isfinite(o[:, :, : S + 1]).all() and torch.isfinite(o[:, :, 2 * S :]).all()


# ----------------------------------------------------------------------------- decode and cascade

def _run_decode(backend):
    def run(q, k, v, lens, window):
        if backend == "reference":
            return reference.decode_attention(q, k, v, lens, window=window, return_lse=True)
        return ops.decode_attention(q, k, v, lens, window=window, return_lse=True, backend=backend)

    return run


def _run_cascade(backend):
    def run(q, ks, vs, kx, vx, sl, window):
        if backend == "reference":
            return reference.cascade_decode(q, ks, vs, kx, vx, sl, window=window, return_lse=True)
        return ops.cascade_decode(q, ks, vs, kx, vx, sl, window=window, return_lse=True, backend=backend)

    return run


@pytest.mark.parametrize("klass, value, which", DECODE_GRID)
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_decode(backend, klass, value, which):
    if backend == "triton":
        pytest.importorskip("triton")
    check_decode(_run_decode(backend), DEVICE if backend == "triton" else "cpu", klass, value, which,
                 f"{backend} decode")


@pytest.mark.parametrize("klass, value, which", CASCADE_GRID)
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_cascade(backend, klass, value, which):
    if backend == "triton":
        pytest.importorskip("triton")
    check_cascade(_run_cascade(backend), DEVICE if backend == "triton" else "cpu", klass, value, which,
                  f"{backend} cascade")


@pytest.mark.cuda
@pytest.mark.parametrize("klass, value, which", DECODE_GRID)
def test_decode_cuda(klass, value, which):
    check_decode(_run_decode("cuda"), "cuda", klass, value, which, "cuda decode", dh=CUDA_DH)


@pytest.mark.cuda
@pytest.mark.parametrize("klass, value, which", CASCADE_GRID)
def test_cascade_cuda(klass, value, which):
    check_cascade(_run_cascade("cuda"), "cuda", klass, value, which, "cuda cascade", dh=CUDA_DH)


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(SEGMENT_CLASSES))
def test_segment_flex_backward_cuda(name):
    """FlexAttention's backward runs on CUDA only."""
    _check_segment("flex", name, "nan", "kv", backward=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(SEGMENT_CLASSES))
def test_segment_triton_16bit_cuda(name, dtype):
    """bf16/fp16 through the compiled kernels (bf16 tl.dot is wrong in the interpreter)."""
    clean_in, poison_in, opts, rows, keys, go, gl = _segment_poison(name, "nan", "kv", dtype)
    clean = _run_segment("triton", clean_in, opts, go, gl)
    dirty = _run_segment("triton", poison_in, opts, go, gl)
    for idx, what in enumerate(("o", "lse", "dq", "dk", "dv")):
        got, want = dirty[idx], clean[idx]
        if idx == 1:
            got, want = got[..., None], want[..., None]
        assert_same(got, want, ~rows if idx < 3 else ~keys, f"triton {dtype} {name} {what}", True)


# -- the no-prefix path (prefill): the torch backend's SDPA fast path -----------------------------
# Blocks over an empty prefix without lse take a separate route (SDPA on folded blocks, keys
# sanitised before it, rows that see a bad key set NaN after it); every class of invisible key
# it can meet: other blocks, future keys of the own block, keys beyond the window.
PREFILL_CLASSES = {
    "other_blocks": (dict(), lambda blk, i: blk == 1),
    "other_blocks_full": (dict(causal=False), lambda blk, i: blk == 1),
    "future_in_block": (dict(), lambda blk, i: i < 2),
    "beyond_window": (dict(window=2), lambda blk, i: i == S - 1),
}


@pytest.mark.parametrize("value, which", VALUE_WHICH)
@pytest.mark.parametrize("name", list(PREFILL_CLASSES))
def test_segment_torch_no_prefix_path(name, value, which):
    opts, pred = PREFILL_CLASSES[name]
    opts = dict(block_len=S, **opts)
    (q, k, v, kp, vp, _), go, _ = _segment_inputs()
    kp, vp = kp[:, :, :0], vp[:, :, :0]
    pl = torch.zeros(B, N, dtype=torch.int32, device=DEVICE)
    vis = segment_visibility(pl, 0, S, opts.get("causal", True), opts.get("window"))
    target = _rows(pred)
    poison = ~(vis & target[:, :, None]).any(1)
    val = poison_value(value, torch.float32)
    kd = put(k, poison.to(DEVICE), val) if "k" in which else k
    vd = put(v, poison.to(DEVICE), val) if "v" in which else v
    rows, keys = taint(vis, poison)

    def run(k, v):
        qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
        o = ops.segment_attention(qq, kk, vv, kp, vp, pl, backend="torch", **opts)
        (o.float() * go).sum().backward()
        return o.detach(), qq.grad, kk.grad, vv.grad

    clean, dirty = run(k, v), run(kd, vd)
    for idx, what in enumerate(("o", "dq", "dk", "dv")):
        sel = ~rows if idx < 2 else ~keys
        if sel.any():
            assert_same(dirty[idx], clean[idx], sel, f"torch no-prefix {name} {which}={value} {what}", True)
    if value != "huge":  # a visible non-finite key is never hidden: every row that sees one is NaN
        seen = rows[:, None, :].expand(dirty[0].shape[:3])
        assert dirty[0][seen].isnan().all(), f"{name} {which}={value}: a row that sees a bad key is not NaN"

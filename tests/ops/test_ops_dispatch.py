"""Input validation, backend selection and the flex backend."""

from __future__ import annotations

import math
import os
import re

import pytest
import torch

import cacheaug_engine
from cacheaug_engine import BackendUnavailableError, ops
from cacheaug_engine.ops import reference
from cacheaug_engine.ops.backends import resolve_backend


def _seg(b=2, hq=4, hkv=2, n=3, s=5, t=11, dh=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n * s, dh, generator=g).to(dtype)
    k = torch.randn(b, hkv, n * s, dh, generator=g).to(dtype)
    v = torch.randn(b, hkv, n * s, dh, generator=g).to(dtype)
    kp = torch.randn(b, hkv, t, dh, generator=g).to(dtype)
    vp = torch.randn(b, hkv, t, dh, generator=g).to(dtype)
    lens = torch.randint(0, t + 1, (b, n), generator=g, dtype=torch.int32)
    return q, k, v, kp, vp, lens


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(prefix_lens=a["prefix_lens"] + 100), "prefix_lens: values must lie in"),
        (lambda a: a.update(prefix_lens=a["prefix_lens"] - 100), "prefix_lens: values must lie in"),
        (lambda a: a.update(prefix_lens=a["prefix_lens"].float()), "prefix_lens: expected dtype int32"),
        (lambda a: a.update(prefix_lens=a["prefix_lens"][:, :2]), r"prefix_lens: expected shape \(2, 3\)"),
        (lambda a: a.update(q=a["q"][..., :8]), "k: expected shape"),
        (lambda a: a.update(q=a["q"][:, :3]), "Hq = 3 must be a multiple of Hkv = 2"),
        (lambda a: a.update(k=a["k"].double()), "k: expected dtype torch.float32"),
        (lambda a: a.update(q=a["q"][0]), "q: expected a 4-D tensor"),
        (lambda a: a.update(block_len=4), "must be a positive multiple of block_len"),
        (lambda a: a.update(block_len=0), "block_len: expected an int >= 1"),
        (lambda a: a.update(window=0), "window: expected None or an int >= 1"),
        (lambda a: a.update(softcap=-1.0), "softcap: expected None or a finite number > 0"),
        (lambda a: a.update(k_prefix=a["k_prefix"][:, :, :5]), "k_prefix/v_prefix: expected shape"),
        (lambda a: a.update(q=a["q"].to(torch.int64)), "q: expected dtype in"),
    ],
)
def test_segment_attention_rejects_bad_input_with_named_argument(mutate, match):
    q, k, v, kp, vp, lens = _seg()
    args = dict(q=q, k=k, v=v, k_prefix=kp, v_prefix=vp, prefix_lens=lens, block_len=5)
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.segment_attention(
            args.pop("q"), args.pop("k"), args.pop("v"), args.pop("k_prefix"), args.pop("v_prefix"),
            args.pop("prefix_lens"), **args,
        )


def test_decode_ops_reject_bad_input():
    q = torch.randn(2, 4, 8)
    k = torch.randn(2, 2, 6, 8)
    with pytest.raises(ValueError, match=r"lens: values must lie in \[0, 6\]"):
        ops.decode_attention(q, k, k, torch.tensor([7, 1]))
    with pytest.raises(ValueError, match=r"lens: expected shape \(2,\)"):
        ops.decode_attention(q, k, k, torch.tensor([1]))
    with pytest.raises(ValueError, match="k_suffix/v_suffix: expected shape"):
        ops.cascade_decode(q, k[0], k[0], k[:, :1], k, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="suffix_lens: with an empty shared prefix"):
        ops.cascade_decode(q, k[0, :, :0], k[0, :, :0], k, k, torch.tensor([0, 1]))
    lse = torch.zeros(2, 4)
    with pytest.raises(TypeError, match="lse_b: expected dtype torch.float32"):
        ops.merge_states(q, lse, q, lse.double())


def test_named_backend_that_cannot_run_raises_with_reason(monkeypatch):
    q, k, v, kp, vp, lens = _seg()
    with pytest.raises(BackendUnavailableError, match="segment_attention has no cuda backend"):
        ops.segment_attention(q, k, v, kp, vp, lens, block_len=5, backend="cuda")
    with pytest.raises(BackendUnavailableError, match=r"^backend='cuda' for decode_attention is unavailable: the cuda "
                       r"backend runs on CUDA tensors, got cpu tensors"):  # fmt: skip
        ops.decode_attention(q[:, :, 0], kp, vp, lens[:, 0], backend="cuda")
    with pytest.raises(ValueError, match="expected one of torch, flex, triton, cuda"):
        ops.segment_attention(q, k, v, kp, vp, lens, block_len=5, backend="cudnn")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        resolve_backend("segment_attention", "triton", torch.device("cpu"))


def test_env_variable_selects_backend_per_op(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("CACHEAUG_BACKEND", "segment_attention=flex,decode_attention=torch")
    assert resolve_backend("segment_attention", None, cpu) == "flex"
    assert resolve_backend("decode_attention", None, cpu) == "torch"
    assert resolve_backend("cascade_decode", None, cpu) == "torch"  # not named: default
    assert resolve_backend("segment_attention", "torch", cpu) == "torch"  # argument wins
    monkeypatch.setenv("CACHEAUG_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="CACHEAUG_BACKEND='cuda'"):
        resolve_backend("segment_attention", None, cpu)
    monkeypatch.delenv("CACHEAUG_BACKEND")
    assert resolve_backend("segment_attention", None, cpu) == "torch"


def test_backends_report_lists_every_backend_with_a_reason():
    report = cacheaug_engine.backends()
    assert set(report) == {"torch", "flex", "triton", "cuda"}
    assert report["torch"]["available"] is True
    for entry in report.values():
        assert entry["available"] or len(entry["reason"]) > 10


@pytest.mark.parametrize("window,softcap,causal", [(None, None, True), (4, 50.0, True), (None, None, False)])
def test_flex_backend_forward_matches_reference(window, softcap, causal):
    q, k, v, kp, vp, lens = _seg(b=2, hq=4, hkv=2, n=3, s=6, t=13, dh=16, seed=7)
    lens[0, 0], lens[1, 2] = 0, 13
    kw = dict(block_len=6, window=window, softcap=softcap, causal=causal, return_lse=True)
    o_ref, lse_ref = reference.segment_attention(q, k, v, kp, vp, lens, **kw)
    o, lse = ops.segment_attention(q, k, v, kp, vp, lens, backend="flex", **kw)
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-4, atol=1e-4)


def test_flex_backend_on_cpu_refuses_training_before_running():
    q, k, v, kp, vp, lens = _seg()
    q.requires_grad_()
    with pytest.raises(BackendUnavailableError, match="forward-only"):
        ops.segment_attention(q, k, v, kp, vp, lens, block_len=5, backend="flex")


def test_public_op_compiles_with_torch_compile_forward_and_backward():
    q, k, v, kp, vp, lens = _seg(seed=11)
    q.requires_grad_()
    compiled = torch.compile(lambda *a: ops.segment_attention(*a, block_len=5, backend="torch"), fullgraph=True)
    out = compiled(q, k, v, kp, vp, lens)
    (grad,) = torch.autograd.grad(out.square().sum(), q)
    q_ref = q.detach().clone().requires_grad_()
    ref = reference.segment_attention(q_ref, k, v, kp, vp, lens, block_len=5)
    (grad_ref,) = torch.autograd.grad(ref.square().sum(), q_ref)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Bad input to the public ops (issue 15): one clear error, before any kernel runs.

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import cacheaug_engine.ops as ops_mod  # noqa: E402
import cacheaug_engine.ops.plan as plan_mod  # noqa: E402

NAN, INF = float("nan"), float("inf")
# where the triton backend runs: CUDA tensors on a GPU machine, CPU tensors under the interpreter
TDEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _to(args: dict, device: str) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in args.items()}


@pytest.fixture
def no_kernel(monkeypatch):
    """Every backend implementation fails the test if it is reached."""

    def launched(op, backend):
        raise AssertionError(f"{op} reached the {backend} backend: validation let bad input through")

    monkeypatch.setattr(plan_mod, "impl", launched)
    monkeypatch.setattr(ops_mod, "impl", launched)


def _seg_args(b=2, hq=4, hkv=2, n=3, s=5, t=11, dh=16):
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return dict(q=r(b, hq, n * s, dh), k=r(b, hkv, n * s, dh), v=r(b, hkv, n * s, dh), k_prefix=r(b, hkv, t, dh),
                v_prefix=r(b, hkv, t, dh), prefix_lens=torch.tensor([[0, 4, 11], [2, 2, 9]], dtype=torch.int32),
                block_len=s)


def _call_segment(a):
    a = dict(a)
    pos = [a.pop(x) for x in ("q", "k", "v", "k_prefix", "v_prefix", "prefix_lens")]
    return ops.segment_attention(*pos, **a)


def _upd(**kw):
    return lambda a: a.update({k: (f(a) if callable(f) else f) for k, f in kw.items()})


# (id, mutation of valid arguments, error type, regex: the argument and what was expected)
SEGMENT_BAD = [
    ("q_not_tensor", _upd(q=lambda a: a["q"].tolist()), TypeError, r"^q: expected a torch\.Tensor"),
    ("q_int_dtype", _upd(q=lambda a: a["q"].long()), TypeError, r"^q: expected dtype in \["),
    ("q_3d", _upd(q=lambda a: a["q"][0]), ValueError, r"^q: expected a 4-D tensor \[B, Hq, N\*S, Dh\]"),
    ("k_5d", _upd(k=lambda a: a["k"][None]), ValueError, r"^k: expected a 4-D tensor"),
    ("v_prefix_3d", _upd(v_prefix=lambda a: a["v_prefix"][0]), ValueError, r"^v_prefix: expected a 4-D tensor"),
    ("k_dtype_mismatch", _upd(k=lambda a: a["k"].half()), TypeError,
     r"^k: expected dtype torch\.float32 \(same as q\)"),
    ("v_prefix_dtype_mismatch", _upd(v_prefix=lambda a: a["v_prefix"].double()), TypeError,
     r"^v_prefix: expected dtype torch\.float32"),
    ("k_wrong_dh", _upd(k=lambda a: a["k"][..., :8]), ValueError, r"^k: expected shape \(2, 2, 15, 16\)"),
    ("v_wrong_rows", _upd(v=lambda a: a["v"][:, :, :10]), ValueError, r"^v: expected shape \(2, 2, 15, 16\)"),
    ("gqa_mismatch", _upd(q=lambda a: a["q"][:, :3]), ValueError, r"^q: Hq = 3 must be a multiple of Hkv = 2"),
    ("zero_kv_heads", _upd(k_prefix=lambda a: a["k_prefix"][:, :0]), ValueError, r"Hkv = 0"),
    ("prefix_T_mismatch", _upd(v_prefix=lambda a: a["v_prefix"][:, :, :5]), ValueError,
     r"^k_prefix/v_prefix: expected shape \(2, 2, 11, 16\)"),
    ("prefix_batch_mismatch", _upd(k_prefix=lambda a: a["k_prefix"][:1]), ValueError,
     r"^k_prefix/v_prefix: expected shape"),
    ("head_dim_0", lambda a: a.update({x: a[x][..., :0] for x in ("q", "k", "v", "k_prefix", "v_prefix")}),
     ValueError, r"^q: head dim \(last dim, Dh\) must be >= 1"),
    ("lens_above_T", _upd(prefix_lens=lambda a: a["prefix_lens"] + 3), ValueError,
     r"^prefix_lens: values must lie in \[0, 11\], got min 3, max 14"),
    ("lens_negative", _upd(prefix_lens=lambda a: a["prefix_lens"] - 1), ValueError,
     r"^prefix_lens: values must lie in \[0, 11\]"),
    ("lens_float", _upd(prefix_lens=lambda a: a["prefix_lens"].float()), TypeError,
     r"^prefix_lens: expected dtype int32 or int64"),
    ("lens_bool", _upd(prefix_lens=lambda a: a["prefix_lens"] > 0), TypeError,
     r"^prefix_lens: expected dtype int32 or int64"),
    ("lens_1d", _upd(prefix_lens=lambda a: a["prefix_lens"][:, 0]), ValueError,
     r"^prefix_lens: expected shape \(2, 3\)"),
    ("lens_list", _upd(prefix_lens=[[0, 4, 11], [2, 2, 9]]), TypeError,
     r"^prefix_lens: expected an int32/int64 torch\.Tensor of shape"),
    ("lens_other_device", _upd(prefix_lens=lambda a: a["prefix_lens"].to("meta")), ValueError,
     r"^prefix_lens: expected device cpu"),
    ("k_other_device", _upd(k=lambda a: a["k"].to("meta")), ValueError, r"^k: expected device cpu \(same as q\)"),
    ("block_len_not_dividing", _upd(block_len=4), ValueError,
     r"^q: dim 2 \(N\*S = 15\) must be a positive multiple of block_len = 4"),
    ("block_len_0", _upd(block_len=0), ValueError, r"^block_len: expected an int >= 1, got 0"),
    ("block_len_float", _upd(block_len=5.0), ValueError, r"^block_len: expected an int >= 1, got 5\.0"),
    ("block_len_bool", _upd(block_len=True), ValueError, r"^block_len: expected an int >= 1, got True"),
    ("softcap_0", _upd(softcap=0.0), ValueError, r"^softcap: expected None or a finite number > 0, got 0\.0"),
    ("softcap_negative", _upd(softcap=-50.0), ValueError, r"^softcap: expected None or a finite number > 0"),
    ("softcap_nan", _upd(softcap=NAN), ValueError, r"^softcap: expected None or a finite number > 0, got nan"),
    ("softcap_inf", _upd(softcap=INF), ValueError, r"^softcap: expected None or a finite number > 0, got inf"),
    ("softcap_str", _upd(softcap="50"), ValueError, r"^softcap: expected None or a finite number > 0, got '50'"),
    ("window_0", _upd(window=0), ValueError, r"^window: expected None or an int >= 1, got 0"),
    ("window_negative", _upd(window=-4), ValueError, r"^window: expected None or an int >= 1, got -4"),
    ("window_float", _upd(window=4.5), ValueError, r"^window: expected None or an int >= 1, got 4\.5"),
    ("window_nan", _upd(window=NAN), ValueError, r"^window: expected None or an int >= 1, got nan"),
    ("window_bool", _upd(window=True), ValueError, r"^window: expected None or an int >= 1, got True"),
    ("scale_nan", _upd(scale=NAN), ValueError, r"^scale: expected None or a finite number > 0, got nan"),
    ("scale_0", _upd(scale=0.0), ValueError, r"^scale: expected None or a finite number > 0, got 0\.0"),
    ("scale_negative", _upd(scale=-0.25), ValueError, r"^scale: expected None or a finite number > 0"),
    ("scale_inf", _upd(scale=-INF), ValueError, r"^scale: expected None or a finite number > 0, got -inf"),
    ("backend_unknown", _upd(backend="cudnn"), ValueError,
     r"^backend='cudnn' for segment_attention: expected one of torch, flex, triton, cuda"),
    ("backend_without_op", _upd(backend="cuda"), BackendUnavailableError,
     r"^backend='cuda': segment_attention has no cuda backend \(it has: triton, flex, torch\)"),
]


@pytest.mark.parametrize("mutate, exc, pattern", [c[1:] for c in SEGMENT_BAD], ids=[c[0] for c in SEGMENT_BAD])
def test_segment_attention_bad_input(mutate, exc, pattern, no_kernel):
    args = _seg_args()
    mutate(args)
    with pytest.raises(exc) as info:
        _call_segment(args)
    assert re.search(pattern, str(info.value)), str(info.value)


# ----------------------------------------------------------------------------- CACHEAUG_BACKEND

ENV_BAD = [
    ("misspelt_op", "segment_atention=flex",
     r"^CACHEAUG_BACKEND='segment_atention=flex': entry 'segment_atention=flex' must be op=backend with op one "
     r"of segment_attention, decode_attention"),
    ("unknown_backend_one_name", "trition", r"^CACHEAUG_BACKEND='trition': unknown backend; expected one of torch"),
    ("unknown_backend_for_other_op", "segment_attention=torch,decode_attention=cudnn",
     r"^CACHEAUG_BACKEND=.*unknown backend 'cudnn' for decode_attention; expected one of torch, flex"),
    ("entry_without_equals", "segment_attention=torch,triton", r"entry 'triton' must be op=backend"),
]


@pytest.mark.parametrize("value, pattern", [c[1:] for c in ENV_BAD], ids=[c[0] for c in ENV_BAD])
def test_cacheaug_backend_env_is_checked(value, pattern, monkeypatch, no_kernel):
    monkeypatch.setenv("CACHEAUG_BACKEND", value)
    with pytest.raises(ValueError) as info:
        _call_segment(_seg_args())
    assert re.search(pattern, str(info.value)), str(info.value)


def test_cacheaug_backend_env_valid_entries_still_work(monkeypatch):
    """Entries with spaces and a trailing comma select their backends: segment_attention runs on flex,
    not on the CPU's default torch (so a variable ignored on the CPU shows), with torch's numbers."""
    reached = []
    real = plan_mod.impl

    def spy(op, backend):
        reached.append((op, backend))
        return real(op, backend)

    monkeypatch.setattr(plan_mod, "impl", spy)
    monkeypatch.setenv("CACHEAUG_BACKEND", " segment_attention = flex , decode_attention=torch ,")
    args = _seg_args()
    got = _call_segment(args)
    assert reached == [("segment_attention", "flex")]
    want = _call_segment(dict(args, backend="torch"))  # the argument wins over the variable
    assert reached[1:] == [("segment_attention", "torch")]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- decode, cascade, merge


def _dec():
    return dict(q=torch.randn(2, 4, 16), k=torch.randn(2, 2, 9, 16), v=torch.randn(2, 2, 9, 16),
                lens=torch.tensor([9, 3]))


def _cas():
    return dict(q=torch.randn(2, 4, 16), k_shared=torch.randn(2, 6, 16), v_shared=torch.randn(2, 6, 16),
                k_suffix=torch.randn(2, 2, 3, 16), v_suffix=torch.randn(2, 2, 3, 16), suffix_lens=torch.tensor([3, 1]))


def _mrg():
    return dict(o_a=torch.randn(3, 4, 16), lse_a=torch.randn(3, 4), o_b=torch.randn(3, 4, 16), lse_b=torch.randn(3, 4))


OTHER_BAD = [
    ("decode_q_4d", _dec, _upd(q=lambda a: a["q"][None]), ValueError, r"^q: expected a 3-D tensor \[B, Hq, Dh\]"),
    ("decode_kv_shapes", _dec, _upd(v=lambda a: a["v"][:, :, :5]), ValueError,
     r"^k/v: expected equal shapes \[B=2, Hkv, Tmax, Dh=16\]"),
    ("decode_gqa", _dec, _upd(q=lambda a: a["q"][:, :3]), ValueError, r"^q: Hq = 3 must be a multiple of Hkv = 2"),
    ("decode_lens_above_tmax", _dec, _upd(lens=torch.tensor([10, 3])), ValueError,
     r"^lens: values must lie in \[0, 9\], got min 3, max 10"),
    ("decode_lens_float", _dec, _upd(lens=torch.tensor([9.0, 3.0])), TypeError, r"^lens: expected dtype int32"),
    ("decode_lens_shape", _dec, _upd(lens=torch.tensor([[9, 3]])), ValueError, r"^lens: expected shape \(2,\)"),
    ("decode_head_dim_0", _dec, lambda a: a.update({x: a[x][..., :0] for x in ("q", "k", "v")}), ValueError,
     r"^q: head dim \(last dim, Dh\) must be >= 1"),
    ("decode_window_nan", _dec, _upd(window=NAN), ValueError, r"^window: expected None or an int >= 1"),
    ("decode_softcap_nan", _dec, _upd(softcap=NAN), ValueError, r"^softcap: expected None or a finite number"),
    ("cascade_shared_4d", _cas, _upd(k_shared=lambda a: a["k_shared"][None]), ValueError,
     r"^k_shared: expected a 3-D tensor \[Hkv, T, Dh\]"),
    ("cascade_shared_mismatch", _cas, _upd(v_shared=lambda a: a["v_shared"][:, :4]), ValueError,
     r"^k_shared/v_shared: expected equal shapes \[Hkv, T, Dh=16\]"),
    ("cascade_suffix_shape", _cas, _upd(v_suffix=lambda a: a["v_suffix"][:1]), ValueError,
     r"^k_suffix/v_suffix: expected shape \(2, 2, 3, 16\)"),
    ("cascade_suffix_lens_above_L", _cas, _upd(suffix_lens=torch.tensor([4, 1])), ValueError,
     r"^suffix_lens: values must lie in \[0, 3\]"),
    ("cascade_empty_shared_and_suffix", _cas,
     _upd(k_shared=lambda a: a["k_shared"][:, :0], v_shared=lambda a: a["v_shared"][:, :0],
          suffix_lens=torch.tensor([3, 0])), ValueError, r"^suffix_lens: with an empty shared prefix"),
    ("cascade_dtype_mismatch", _cas, _upd(v_suffix=lambda a: a["v_suffix"].half()), TypeError,
     r"^v_suffix: expected dtype torch\.float32 \(same as q\)"),
    ("merge_lse_dtype", _mrg, _upd(lse_a=lambda a: a["lse_a"].half()), TypeError,
     r"^lse_a: expected dtype torch\.float32 \(the lse of torch\.float32 states\)"),
    ("merge_lse_shape", _mrg, _upd(lse_b=lambda a: a["lse_b"][:2]), ValueError,
     r"^lse_b: expected shape \(3, 4\) \(o_a without Dh\)"),
    ("merge_o_shape", _mrg, _upd(o_b=lambda a: a["o_b"][..., :8]), ValueError,
     r"^o_b: expected the shape of o_a \(3, 4, 16\)"),
    ("merge_o_int", _mrg, _upd(o_a=lambda a: a["o_a"].int()), TypeError, r"^o_a: expected dtype in \["),
    ("merge_lse_not_tensor", _mrg, _upd(lse_b=0.0), TypeError, r"^lse_b: expected a torch\.Tensor, got float"),
]


@pytest.mark.parametrize("make, mutate, exc, pattern", [c[1:] for c in OTHER_BAD], ids=[c[0] for c in OTHER_BAD])
def test_decode_cascade_merge_bad_input(make, mutate, exc, pattern, no_kernel):
    args = make()
    mutate(args)
    fn = {_dec: ops.decode_attention, _cas: ops.cascade_decode, _mrg: ops.merge_states}[make]
    with pytest.raises(exc) as info:
        fn(*[args.pop(k) for k in list(args) if k in {
            "q", "k", "v", "lens", "k_shared", "v_shared", "k_suffix", "v_suffix", "suffix_lens",
            "o_a", "lse_a", "o_b", "lse_b"}], **args)
    assert re.search(pattern, str(info.value)), str(info.value)


# ----------------------------------------------------------------------------- Triton-specific (fused kernels)


@pytest.fixture
def no_triton_launch(monkeypatch):
    pytest.importorskip("triton")
    from cacheaug_engine.triton_kernels import segment_attention as sa

    def launched(*args, **kwargs):
        raise AssertionError("a Triton kernel was launched")

    monkeypatch.setattr(sa, "segment_attention_fwd", launched)


TRITON_BAD = [
    ("k_prefix_requires_grad", lambda a: a["k_prefix"].requires_grad_(), ValueError,
     r"^k_prefix: the fused segment attention computes no gradient for the prefix"),
    ("both_prefixes_require_grad", lambda a: (a["k_prefix"].requires_grad_(), a["v_prefix"].requires_grad_()),
     ValueError, r"^k_prefix and v_prefix: the fused segment attention computes no gradient"),
    ("float64", lambda a: a.update({x: a[x].double() for x in ("q", "k", "v", "k_prefix", "v_prefix")}),
     BackendUnavailableError, r"^backend='triton' for segment_attention is unavailable: triton runs "
     r"segment_attention in float32, float16, bfloat16, got float64"),
    ("head_dim_272", lambda a: a.update({x: torch.randn(*a[x].shape[:3], 272, device=a[x].device) for x in
                                         ("q", "k", "v", "k_prefix", "v_prefix")}),
     BackendUnavailableError, r"^backend='triton' for segment_attention is unavailable: .*head dims 1\.\.256, "
     r"got 272"),
]


@pytest.mark.parametrize("mutate, exc, pattern", [c[1:] for c in TRITON_BAD], ids=[c[0] for c in TRITON_BAD])
def test_triton_segment_bad_input(mutate, exc, pattern, no_triton_launch):
    args = _to(_seg_args(), TDEV)
    mutate(args)
    with pytest.raises(exc) as info:
        _call_segment(dict(args, backend="triton"))
    assert re.search(pattern, str(info.value)), str(info.value)


# ----------------------------------------------------------------------------- unusual but valid: must work


def _expanded_cache():
    a = _seg_args(b=1)
    a = {k: (v.expand(3, *v.shape[1:]) if torch.is_tensor(v) and v.dim() == 4 else v) for k, v in a.items()}
    a["prefix_lens"] = torch.tensor([[0, 4, 11]] * 3, dtype=torch.int64)
    return a


WORKS = {
    "transposed_views": lambda: {k: (v.transpose(1, 2).contiguous().transpose(1, 2) if torch.is_tensor(v) and v.dim()
                                     == 4 else v) for k, v in _seg_args().items()},
    "batch_expanded_stride0": _expanded_cache,
    "int64_noncontiguous_lens": lambda: dict(_seg_args(), prefix_lens=torch.tensor([[0, 2], [4, 2], [11, 9]]).t()),
    "dh_slice_stride2": lambda: {k: (torch.randn(*v.shape[:3], 32)[..., ::2] if torch.is_tensor(v) and v.dim() == 4
                                     else v) for k, v in _seg_args().items()},
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(WORKS))
def test_unusual_layouts_work(name, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    args = WORKS[name]()
    assert not all(x.is_contiguous() for x in args.values() if torch.is_tensor(x))
    args = _to(args, TDEV if backend == "triton" else "cpu")  # (a copy to a GPU may lose the odd strides)
    out = _call_segment(dict(args, backend=backend))
    pos = [args[x] for x in ("q", "k", "v", "k_prefix", "v_prefix", "prefix_lens")]
    ref = reference.segment_attention(*[x.contiguous() for x in pos], block_len=args["block_len"])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_meta_tensors_give_shapes():
    """Meta tensors carry no values: the value checks are skipped and the torch backend runs."""
    m = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    lens = torch.zeros(2, 3, dtype=torch.int32, device="meta")
    o, lse = ops.segment_attention(m(2, 4, 15, 16), m(2, 2, 15, 16), m(2, 2, 15, 16), m(2, 2, 7, 16),
                                   m(2, 2, 7, 16), lens, block_len=5, return_lse=True)
    assert o.device.type == "meta" and o.shape == (2, 4, 15, 16) and lse.shape == (2, 4, 15)
    o = ops.cascade_decode(m(2, 4, 16), m(2, 0, 16), m(2, 0, 16), m(2, 2, 3, 16), m(2, 2, 3, 16),
                           torch.ones(2, dtype=torch.int64, device="meta"))
    assert o.shape == (2, 4, 16)
    o, lse = ops.merge_states(m(2, 4, 16), m(2, 4), m(2, 4, 16), m(2, 4))
    assert o.shape == (2, 4, 16) and lse.shape == (2, 4)


def test_fake_tensors_skip_value_checks():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _seg_args()
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = {k: (mode.from_tensor(v) if torch.is_tensor(v) else v) for k, v in args.items()}
        o = _call_segment(dict(fake, backend="torch"))
    assert o.shape == args["q"].shape


# ----------------------------------------------------------------------------- merge_states contract


@pytest.mark.parametrize("backend", ["torch", "triton", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_merge_states_nan_and_empty_contract(backend):
    """NaN lse in -> NaN out (never the 0 of an empty state); an empty part (-inf) contributes
    nothing, whatever its o holds; two empty parts give o = 0, lse = -inf."""
    if backend == "triton":
        pytest.importorskip("triton")
    dev = {"cuda": "cuda", "triton": TDEV}.get(backend, "cpu")
    o_a, o_b = torch.randn(5, 8, device=dev), torch.randn(5, 8, device=dev)
    lse_a = torch.tensor([NAN, 0.3, -INF, -INF, NAN], device=dev)
    lse_b = torch.tensor([0.1, NAN, 0.2, -INF, -INF], device=dev)
    o_a[2] = NAN  # empty part holding garbage
    o_b[3] = INF
    o, lse = ops.merge_states(o_a, lse_a, o_b, lse_b, backend=backend)
    assert torch.isnan(o[[0, 1, 4]]).all() and torch.isnan(lse[[0, 1, 4]]).all()
    torch.testing.assert_close(o[2], o_b[2])
    assert lse[2].item() == pytest.approx(0.2)
    assert torch.equal(o[3].cpu(), torch.zeros(8)) and lse[3].item() == -math.inf

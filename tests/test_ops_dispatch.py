"""Input validation, backend selection and the flex backend."""

from __future__ import annotations

import pytest
import torch

import cacheaug_engine
from cacheaug_engine import BackendUnavailableError, ops, reference
from cacheaug_engine.backends import resolve_backend


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
    with pytest.raises(BackendUnavailableError, match="cuda"):
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

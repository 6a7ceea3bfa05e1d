"""GPU-only checks of the fused Triton segment attention (marked `cuda`, skipped without a GPU).

tests/kernels/test_triton_segment_attention.py already runs on CUDA tensors when a GPU is present;
this file adds what the interpreter cannot check: bf16 through real tl.dot, all head dims
in 16-bit forward and backward, model-shaped heads, a long cache (T = 16k), autotuning,
and torch.compile on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("hypothesis")

from cacheaug_engine.triton_kernels import segment_attention as sa  # noqa: E402
from test_triton_segment_attention import check_case, make_case  # noqa: E402

from cacheaug_engine import ops
from cacheaug_engine.ops import reference  # noqa: E402

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _compiled_triton():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: the GPU tests need compiled kernels")


@pytest.fixture(autouse=True)
def _fixed_configs(monkeypatch):
    # One compile per kernel variant instead of an autotuning sweep per shape;
    # test_autotune_matches_fixed_config turns autotuning back on.
    monkeypatch.setenv("CACHEAUG_AUTOTUNE", "0")


HEADS = {  # (Hq, Hkv, Dh, softcap) of the models the issue names
    "gemma2": (8, 4, 256, 50.0),
    "llama3": (32, 8, 128, None),
    "smollm2": (9, 3, 64, None),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("model", list(HEADS))
@pytest.mark.parametrize("s", [31, 79])
def test_model_heads(model, s, dtype):
    hq, hkv, dh, softcap = HEADS[model]
    t = 300
    lens = [[0, 120, 250, t]]
    inputs = make_case(1, hq, hkv, 4, s, t, dh, lens=lens, seed=s)
    opts = dict(block_len=s, softcap=softcap)
    check_case(inputs, opts, dtype=dtype, backward=True, lse_grad=False)
    if model == "gemma2":  # Gemma-2 local layers: sliding window 4096 > T, and a short one
        check_case(inputs, dict(opts, window=64), dtype=dtype, backward=True, lse_grad=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dh", [64, 80, 96, 128, 256])
def test_head_dims_fwd_bwd(dh, dtype):
    inputs = make_case(2, 6, 2, 3, 19, 90, dh, seed=dh)
    check_case(inputs, dict(block_len=19, window=40), dtype=dtype, backward=True, lse_grad=False)
    check_case(inputs, dict(block_len=19, causal=False), dtype=dtype, backward=True, lse_grad=False)


@pytest.mark.parametrize("group", [1, 3, 8])
def test_gqa_ratios_bf16(group):
    inputs = make_case(2, 2 * group, 2, 5, 7, 64, 64, seed=group)
    check_case(inputs, dict(block_len=7, softcap=20.0), dtype=torch.bfloat16, backward=True, lse_grad=False)


def test_long_cache_bf16():
    """T = 16k, a few blocks of S = 31 spread over the cache (p_k = 0 and p_k = T included)."""
    t = 16384
    inputs = make_case(1, 8, 4, 4, 31, t, 128, lens=[[0, 5000, 12001, t]], seed=16)
    check_case(inputs, dict(block_len=31), dtype=torch.bfloat16, backward=True, lse_grad=False)
    check_case(inputs, dict(block_len=31, window=4096, softcap=50.0), dtype=torch.bfloat16,
               backward=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autotune_matches_fixed_config(dtype, monkeypatch):
    inputs = make_case(1, 8, 4, 6, 31, 512, 128, seed=21)
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
    go = torch.randn(inputs[0].shape, device="cuda")
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("CACHEAUG_AUTOTUNE", flag)
        q, k, v = (x.detach().clone().requires_grad_() for x in inputs[:3])
        o = sa.segment_attention(q, k, v, *inputs[3:], block_len=31)
        results.append([o, *torch.autograd.grad((o.float() * go).sum(), (q, k, v))])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_default_backend_on_cuda_is_triton(monkeypatch):
    monkeypatch.delenv("CACHEAUG_BACKEND", raising=False)
    inputs = make_case(1, 4, 2, 2, 9, 40, 64, dtype=torch.bfloat16, seed=22)
    calls = []
    real = sa.segment_attention_fwd
    monkeypatch.setattr(sa, "segment_attention_fwd", lambda *a: calls.append(1) or real(*a))
    out = ops.segment_attention(*inputs, block_len=9)
    assert calls, "ops.segment_attention did not dispatch to the triton backend on CUDA"
    ref = reference.segment_attention(*inputs, block_len=9)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_torch_compile_cuda():
    q, k, v, kp, vp, pl = make_case(1, 4, 2, 3, 16, 64, 64, dtype=torch.bfloat16, seed=23)
    q.requires_grad_()
    k.requires_grad_()

    def loss(q, k):
        return sa.segment_attention(q, k, v, kp, vp, pl, block_len=16, softcap=30.0).float().square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    compiled(q, k).backward()
    q2, k2 = (x.detach().clone().requires_grad_() for x in (q, k))
    loss(q2, k2).backward()
    torch.testing.assert_close(q.grad, q2.grad)
    torch.testing.assert_close(k.grad, k2.grad)

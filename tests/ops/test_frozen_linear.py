"""ops.frozen_linear: oneDNN on packed weights vs F.linear, forward and backward, and its dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cacheaug_engine.models import Decoder, DecoderConfig
from cacheaug_engine.ops.frozen_linear import FrozenLinear, frozen_linear, onednn_reason

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

FLOOR = 2e-5  # fp32, as in the attention kernels' tests

# (leading dims of x, K, N, bias): odd sizes, one row, no rows, a vocab-sized N
SHAPES = [
    ((7,), 5, 3, False),
    ((1,), 576, 576, True),
    ((2, 33), 96, 160, True),
    ((3, 4, 5), 64, 48, False),
    ((0,), 32, 16, True),
    ((1, 9), 128, 4099, False),
    ((93,), 1536, 576, False),
]


def _case(lead, k, n, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g)
    w = 0.05 * torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    return x, w, b


def _err(got, want):
    return (got.double() - want).abs().max().item() if got.numel() else 0.0


def _tol(torch_err, want):
    return 2 * torch_err + FLOOR * max(1.0, want.abs().max().item() if want.numel() else 1.0)


@pytest.mark.parametrize("lead,k,n,bias", SHAPES)
def test_forward_and_backward_match_float64(lead, k, n, bias):
    x, w, b = _case(lead, k, n, bias)
    dy = torch.randn(*lead, n, generator=torch.Generator().manual_seed(1))
    x64 = x.double().requires_grad_()
    want = F.linear(x64, w.double(), None if b is None else b.double())
    (want_dx,) = torch.autograd.grad(want, x64, dy.double()) if want.numel() else (torch.zeros_like(x64),)
    outs = {}
    for backend in ("torch", "onednn"):
        xi = x.clone().requires_grad_()
        y = frozen_linear(xi, w, b, backend=backend)
        (dx,) = torch.autograd.grad(y, xi, dy) if y.numel() else (torch.zeros_like(xi),)
        assert y.shape == (*lead, n) and y.dtype == torch.float32 and dx.shape == x.shape
        outs[backend] = (y, dx)
    for i, name in enumerate(("y", "dx")):
        ref = (want, want_dx)[i].detach()
        base = _err(outs["torch"][i], ref)
        err = _err(outs["onednn"][i], ref)
        assert err <= _tol(base, ref), f"{name}: oneDNN error {err:.3g} vs torch {base:.3g}"


def test_non_contiguous_input_and_weight():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 2 * 40, generator=g)[:, ::2]
    w = torch.randn(40, 24, generator=g).t()  # a transposed view [24, 40]
    got = frozen_linear(x, w, backend="onednn")
    want = F.linear(x.double(), w.double())
    assert _err(got, want) <= _tol(_err(F.linear(x, w), want), want)


def test_weight_gets_no_grad_and_bias_path():
    x, w, b = _case((4, 3), 16, 8, True)
    x.requires_grad_()
    frozen_linear(x, w, b, backend="onednn").sum().backward()
    assert x.grad is not None and w.grad is None and b.grad is None
    assert torch.allclose(x.grad, w.sum(0).expand_as(x), atol=1e-5)


def test_named_onednn_raises_with_the_reason():
    x, w, _ = _case((2,), 8, 4, False)
    with pytest.raises(RuntimeError, match="frozen"):
        frozen_linear(x, w.clone().requires_grad_(), backend="onednn")
    with pytest.raises(RuntimeError, match="float32 only"):
        frozen_linear(x.double(), w.double(), backend="onednn")
    with pytest.raises(RuntimeError, match="float32 only"):
        frozen_linear(x.bfloat16(), w.bfloat16(), backend="onednn")
    with pytest.raises(ValueError, match="linear backend"):
        frozen_linear(x, w, backend="mkl")
    assert onednn_reason(x, w) is None


def test_auto_trains_a_trainable_weight_with_torch():
    x, w, _ = _case((5,), 8, 4, False)
    w.requires_grad_()
    frozen_linear(x, w).sum().backward()  # auto: oneDNN cannot give W a gradient, torch does
    assert torch.allclose(w.grad, x.sum(0).expand_as(w))


def test_pack_follows_in_place_and_replaced_weights():
    lin = FrozenLinear(12, 6).requires_grad_(False)
    x = torch.randn(3, 12)
    first = lin(x)
    assert torch.allclose(first, F.linear(x, lin.weight, lin.bias), atol=1e-6)
    with torch.no_grad():
        lin.weight.mul_(-2.0)  # in place: version counter moves, the pack is remade
    assert torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-5)
    lin.weight = torch.nn.Parameter(torch.randn(6, 12), requires_grad=False)  # a new tensor
    assert torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-5)


def test_weight_changed_between_forward_and_backward_is_refused():
    x, w, _ = _case((3,), 8, 4, False)
    x.requires_grad_()
    y = frozen_linear(x, w, backend="onednn")
    w.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_first_call_under_inference_mode_then_with_autograd():
    lin = FrozenLinear(10, 7).requires_grad_(False)
    x = torch.randn(2, 10)
    with torch.inference_mode():
        a = lin(x)
    xg = x.clone().requires_grad_()
    lin(xg).sum().backward()
    assert torch.allclose(a, F.linear(x, lin.weight, lin.bias), atol=1e-6)
    assert torch.allclose(xg.grad, lin.weight.sum(0).expand_as(x), atol=1e-5)


def _tiny_decoder():
    cfg = DecoderConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16)
    return Decoder.from_config(cfg, seed=3)


def test_decoder_backends_agree_forward_and_backward():
    dec = _tiny_decoder()
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(4))
    x0 = dec.embed(ids).detach()
    got = {}
    for backend in ("torch", "onednn"):
        dec.linear_backend = backend
        assert dec.linear_backend == backend
        x = x0.clone().requires_grad_()
        logits = dec.prefill(inputs_embeds=x)[0]
        logits.logsumexp(-1).sum().backward()
        got[backend] = (logits.detach(), x.grad)
    for a, b in zip(got["torch"], got["onednn"], strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    assert all(p.grad is None for p in dec.parameters())


def test_decoder_linear_backend_is_validated():
    dec = _tiny_decoder()
    with pytest.raises(ValueError, match="linear backend"):
        dec.linear_backend = "fast"
    assert dec.linear_backend == "auto"

"""`pytest bench/ --benchmark-only`: each op's backends and plain-PyTorch peers under pytest-benchmark.

CPU: small shapes (seconds). CUDA: one model-sized shape per op (SmolLM2 / Llama-3-8B
heads), synchronised so the timings are real. The full harness with peers, FLOP
counting and JSON output is `cacheaug bench ...` (bench/cli.py).
"""

from __future__ import annotations

import pytest
import torch
from cacheaug_engine.bench import ops_segment
from cacheaug_engine.bench.shapes import MODELS, SMOKE_MODELS, SegmentShape


def _shape(device: torch.device) -> SegmentShape:
    if device.type == "cuda":
        m = MODELS["llama3-8b"]
        return SegmentShape(m.name, m.hq, m.hkv, m.dh, t=4096, n=64, n_l=16, n_a=16, softcap=None,
                            window=None)
    m = SMOKE_MODELS["smollm2-135m"]
    return SegmentShape(m.name, m.hq, m.hkv, m.dh, t=256, n=8, n_l=4, n_a=16, softcap=None, window=None)


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _synced(fn, device: torch.device):
    def run():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def _skip_unavailable(name: str, device: torch.device) -> None:
    from cacheaug_engine.ops.backends import backend_reason

    if not name.startswith("peer:") and backend_reason(name, device) is not None:
        pytest.skip(backend_reason(name, device))


def _segment_fwd(name: str, device: torch.device, grad: bool):
    """(forward callable, inputs) of one segment_attention backend or peer on this device's shape."""
    _skip_unavailable(name, device)
    shape = _shape(device)
    x = ops_segment._inputs(shape, device, _dtype(device), grad=grad)
    fwd = ops_segment._peer(name[5:], shape, x, grad) if name.startswith("peer:") else \
        ops_segment._ours(name, shape, x)
    return fwd, x


@pytest.mark.parametrize("name", ["torch", "triton", "flex", "peer:sdpa_dense", "peer:naive_loop"])
def test_segment_attention_fwd(benchmark, device, name):
    fwd, _ = _segment_fwd(name, device, grad=False)
    with torch.no_grad():
        benchmark(_synced(fwd, device))


@pytest.mark.parametrize("name", ["torch", "triton", "peer:sdpa_dense"])
def test_segment_attention_fwdbwd(benchmark, device, name):
    fwd, x = _segment_fwd(name, device, grad=True)
    step, zero = ops_segment._with_backward(fwd, x, True)

    def run():
        zero()
        step()

    benchmark(_synced(run, device))


@pytest.mark.parametrize("name", ["torch", "triton", "cuda", "peer:sdpa"])
def test_decode_attention(benchmark, device, name):
    from cacheaug_engine.bench.peers import sdpa

    from cacheaug_engine import decode_attention

    _skip_unavailable(name, device)
    b, hq, hkv, dh, t = (16, 32, 8, 128, 32768) if device.type == "cuda" else (2, 9, 3, 64, 512)
    dt = _dtype(device)
    q = torch.randn(b, hq, dh, device=device, dtype=dt)
    k = torch.randn(b, hkv, t, dh, device=device, dtype=dt)
    v = torch.randn_like(k)
    lens = torch.full((b,), t, dtype=torch.int32, device=device)
    if name == "peer:sdpa":
        fn = lambda: sdpa(q.unsqueeze(2), k, v, None, dh ** -0.5)  # noqa: E731
    else:
        fn = lambda: decode_attention(q, k, v, lens, backend=name)  # noqa: E731
    benchmark(_synced(fn, device))

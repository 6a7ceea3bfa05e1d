"""Segment attention (cacheaug_engine/ops/__init__.py): our backends vs peers, forward and forward+backward.

Ours: cacheaug_engine.segment_attention with backend torch / flex / triton.
Peers (backend names start with "peer:"):
  peer:flex_compiled   FlexAttention (torch.compile on CUDA, eager on the CPU) with an
                       equivalent BlockMask built once, keys concatenated per call
  peer:sdpa_dense      SDPA over concatenated keys [T + N*S] with a dense bool mask
                       (SDPA has no softcap: on softcap models it computes without it;
                       the record says so)
  peer:naive_loop      one attention call per block over [prefix[:p_k] ; block k]
                       (SDPA, or plain matmul-softmax when a softcap is needed)
  peer:flash_attn      flash-attn varlen over per-block gathered keys (gather timed)
  peer:flashinfer      FlashInfer single prefill with the dense custom mask
Useful FLOPs count visible scores only (bench.flops).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import flops as F
from . import peers
from .records import BenchContext, Unavailable, Work
from .shapes import SegmentShape

OUR_BACKENDS = ("triton", "flex", "torch")
PEERS = ("flex_compiled", "sdpa_dense", "naive_loop", "flash_attn", "flashinfer")
MODES = ("fwd", "fwdbwd")


def _inputs(shape: SegmentShape, device: torch.device, dtype: torch.dtype, grad: bool) -> dict[str, Any]:
    g = torch.Generator(device="cpu").manual_seed(0)
    ns = shape.n * shape.s

    def rnd(*size: int) -> Tensor:
        return torch.randn(*size, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)

    q = rnd(shape.b, shape.hq, ns, shape.dh).requires_grad_(grad)
    k = rnd(shape.b, shape.hkv, ns, shape.dh).requires_grad_(grad)
    v = rnd(shape.b, shape.hkv, ns, shape.dh).requires_grad_(grad)
    kp = rnd(shape.b, shape.hkv, shape.t, shape.dh)
    vp = rnd(shape.b, shape.hkv, shape.t, shape.dh)
    do = rnd(shape.b, shape.hq, ns, shape.dh) if grad else None
    return {"q": q, "k": k, "v": v, "kp": kp, "vp": vp, "do": do, "lens": shape.prefix_lens(device),
            "scale": 1.0 / math.sqrt(shape.dh)}


def _with_backward(forward: Callable[[], Tensor], x: dict[str, Any], grad: bool):
    """(fn, setup): fn runs forward (+ backward with a fixed upstream gradient)."""
    if not grad:
        def fwd_only() -> None:
            with torch.no_grad():
                forward()
        return fwd_only, None

    def fwd_bwd() -> None:
        forward().backward(x["do"])

    def zero() -> None:
        for name in ("q", "k", "v"):
            x[name].grad = None

    return fwd_bwd, zero


def _ours(backend: str, shape: SegmentShape, x: dict[str, Any]) -> Callable[[], Tensor]:
    from cacheaug_engine import segment_attention
    from cacheaug_engine.ops.backends import backend_reason

    reason = backend_reason(backend, x["q"].device)
    if reason is not None:
        raise Unavailable(reason)
    return lambda: segment_attention(
        x["q"], x["k"], x["v"], x["kp"], x["vp"], x["lens"], block_len=shape.s, causal=shape.causal,
        softcap=shape.softcap, window=shape.window, backend=backend,
    )


def _flex_peer(shape: SegmentShape, x: dict[str, Any], grad: bool) -> Callable[[], Tensor]:
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except Exception as exc:  # noqa: BLE001
        raise Unavailable(f"FlexAttention does not import: {exc}") from exc
    from cacheaug_engine.ops.flex_impl import build_block_mask

    dev = x["q"].device
    if dev.type != "cuda" and grad:
        raise Unavailable("FlexAttention has no backward on the CPU")
    fn = torch.compile(flex_attention, dynamic=False) if dev.type == "cuda" else flex_attention
    ns = shape.n * shape.s
    mask = build_block_mask(x["lens"], shape.t, ns, shape.s, shape.causal, shape.window)
    cap = shape.softcap
    score_mod = None
    if cap is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)

    def run() -> Tensor:
        kc = torch.cat([x["kp"], x["k"]], dim=2)
        vc = torch.cat([x["vp"], x["v"]], dim=2)
        return fn(x["q"], kc, vc, score_mod=score_mod, block_mask=mask, scale=x["scale"],
                  enable_gqa=shape.hq != shape.hkv)

    return run


def _sdpa_dense(shape: SegmentShape, x: dict[str, Any]) -> Callable[[], Tensor]:
    mask = peers.dense_segment_mask(x["lens"], shape.t, shape.s, shape.causal, shape.window)

    def run() -> Tensor:
        kc = torch.cat([x["kp"], x["k"]], dim=2)
        vc = torch.cat([x["vp"], x["v"]], dim=2)
        return peers.sdpa(x["q"], kc, vc, mask, x["scale"])

    return run


def _naive_loop(shape: SegmentShape, x: dict[str, Any]) -> Callable[[], Tensor]:
    lens = x["lens"].cpu().tolist()
    s = shape.s
    dev = x["q"].device
    masks = {(bi, blk): peers.block_local_mask(int(lens[bi][blk]), s, shape.causal, shape.window, dev)
             for bi in range(shape.b) for blk in range(shape.n)}

    def run() -> Tensor:
        outs = []
        for bi in range(shape.b):
            row = []
            for blk in range(shape.n):
                p = int(lens[bi][blk])
                sl = slice(blk * s, (blk + 1) * s)
                kk = torch.cat([x["kp"][bi, :, :p], x["k"][bi, :, sl]], dim=1)
                vv = torch.cat([x["vp"][bi, :, :p], x["v"][bi, :, sl]], dim=1)
                qq = x["q"][bi, :, sl]
                m = masks[(bi, blk)]
                if shape.softcap is None:
                    row.append(peers.sdpa(qq, kk, vv, m, x["scale"]))
                else:
                    row.append(peers.eager_attention(qq, kk, vv, m, x["scale"], shape.softcap))
            outs.append(torch.cat(row, dim=1))
        return torch.stack(outs)

    return run


def _peer(name: str, shape: SegmentShape, x: dict[str, Any], grad: bool) -> Callable[[], Tensor]:
    args = (x["q"], x["k"], x["v"], x["kp"], x["vp"], x["lens"], shape.s, shape.causal, shape.softcap,
            shape.window, x["scale"])
    if name == "flex_compiled":
        return _flex_peer(shape, x, grad)
    if name == "sdpa_dense":
        return _sdpa_dense(shape, x)
    if name == "naive_loop":
        return _naive_loop(shape, x)
    if name == "flash_attn":
        return peers.flash_attn_segment(*args)
    if name == "flashinfer":
        if grad:
            raise Unavailable("FlashInfer has no backward")
        return peers.flashinfer_segment(*args)
    raise ValueError(name)


def run_segment(ctx: BenchContext, shapes: list[SegmentShape], dtype: torch.dtype,
                modes: tuple[str, ...] = MODES, backends: tuple[str, ...] = OUR_BACKENDS,
                peer_names: tuple[str, ...] = PEERS) -> None:
    ctx.start_section("segment_attention", len(shapes) * len(modes) * (len(backends) + len(peer_names)))
    for shape in shapes:
        for mode in modes:
            _run_one(ctx, shape, mode, dtype, backends, peer_names)
    ctx.close_section()


def _run_one(ctx: BenchContext, shape: SegmentShape, mode: str, dtype: torch.dtype,
             backends: tuple[str, ...], peer_names: tuple[str, ...]) -> None:
    """All backends and peers of one (shape, mode); inputs are shared and freed on return."""
    grad = mode == "fwdbwd"
    op = f"segment_attention.{mode}"
    x: dict[str, Any] = {}
    if not ctx.over_budget():
        try:
            x = _inputs(shape, ctx.device, dtype, grad)
        except Exception as exc:  # noqa: BLE001 - e.g. OOM allocating inputs: recorded per case
            x = {"error": exc}
    lens = shape.prefix_lens("cpu")
    elt = torch.finfo(dtype).bits // 8
    work = Work(
        flops=F.segment_flops(lens, shape.s, shape.hq, shape.dh, causal=shape.causal, window=shape.window,
                              backward=grad),
        bytes=F.segment_bytes(shape.b, shape.hq, shape.hkv, shape.n * shape.s, int(lens.max()), shape.dh,
                              elt),
    )

    def prepare(name: str):
        if "error" in x:
            raise x["error"]
        forward = _peer(name[5:], shape, x, grad) if name.startswith("peer:") else _ours(name, shape, x)
        fn, setup = _with_backward(forward, x, grad)
        return fn, setup, work

    for name in [*backends, *(f"peer:{p}" for p in peer_names)]:
        note = None
        if name == "peer:sdpa_dense" and shape.softcap is not None:
            note = "SDPA has no softcap: computed without it (same masks and FLOPs)"
        if name == "peer:flex_compiled" and ctx.device.type != "cuda":
            note = "eager FlexAttention on the CPU"
        ctx.measure(op, name, shape.as_dict(), dtype, lambda name=name: prepare(name), note=note)

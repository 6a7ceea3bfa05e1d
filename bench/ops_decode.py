"""Decode ops (cacheaug_engine/ops/__init__.py): decode_attention, cascade_decode, merge_states.

All three are memory-bound: GB/s counts the bytes that must be read at least once
(bench.flops), and % of peak is against the measured device copy bandwidth.

decode_attention peers: peer:sdpa (one query row, dense mask only when a window needs
it), peer:flash_attn (flash_attn_with_kvcache), peer:flashinfer (paged batch decode).
cascade_decode peers: peer:concat_sdpa (per step: expand + concatenate the shared
prefix per request, then SDPA - what a cache without sharing does),
peer:decode_copies (our best decode_attention on per-request copies made beforehand:
the prefix is read B times), peer:flash_attn on those copies, peer:flashinfer_shared
(paged decode whose page tables all point at the same prefix pages).
merge_states: backends only (speedups vs the torch backend).
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
from .shapes import DecodeShape

OUR_BACKENDS = ("cuda", "triton", "torch")
PAGE = 16


def _rnd(g: torch.Generator, device: torch.device, dtype: torch.dtype, *size: int) -> Tensor:
    return torch.randn(*size, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def _check(backend: str, device: torch.device) -> None:
    from cacheaug_engine.ops.backends import backend_reason

    reason = backend_reason(backend, device)
    if reason is not None:
        raise Unavailable(reason)


def _window_mask(lens: Tensor, length: int, window: int | None, device: torch.device) -> Tensor | None:
    """bool [B, 1, 1, length] for per-request lengths (None when every key is visible)."""
    pos = torch.arange(length, device=device).view(1, length)
    n = lens.to(device).long().view(-1, 1)
    if window is None and bool((n == length).all()):
        return None
    vis = pos < n
    if window is not None:
        vis = vis & (pos > n - 1 - window)
    return vis.view(-1, 1, 1, length)


def _sdpa_decode(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    return peers.sdpa(q.unsqueeze(2), k, v, mask, scale).squeeze(2)


def _section(ctx: BenchContext, op: str, shapes: list[DecodeShape], dtype: torch.dtype, names: list[str],
             one: Callable[[BenchContext, DecodeShape, torch.dtype, list[str]], None]) -> None:
    ctx.start_section(op, len(shapes) * len(names))
    for sh in shapes:
        one(ctx, sh, dtype, names)
    ctx.close_section()


def _inputs(ctx: BenchContext, make: Callable[[torch.Generator], dict[str, Any]]) -> dict[str, Any]:
    """make(a generator seeded 0); {} when over the time budget, {"error": exc} when making fails (OOM)."""
    if ctx.over_budget():
        return {}
    try:
        return make(torch.Generator().manual_seed(0))
    except Exception as exc:  # noqa: BLE001
        return {"error": exc}


def run_decode(ctx: BenchContext, shapes: list[DecodeShape], dtype: torch.dtype) -> None:
    names = [*OUR_BACKENDS, "peer:sdpa", "peer:flash_attn", "peer:flashinfer"]
    _section(ctx, "decode_attention", shapes, dtype, names, _decode_one)


def _decode_one(ctx: BenchContext, sh: DecodeShape, dtype: torch.dtype, names: list[str]) -> None:
    elt = torch.finfo(dtype).bits // 8
    x = _inputs(ctx, lambda g: {"q": _rnd(g, ctx.device, dtype, sh.b, sh.hq, sh.dh),
                                "k": _rnd(g, ctx.device, dtype, sh.b, sh.hkv, sh.t, sh.dh),
                                "v": _rnd(g, ctx.device, dtype, sh.b, sh.hkv, sh.t, sh.dh),
                                "lens": torch.full((sh.b,), sh.t, dtype=torch.int32, device=ctx.device)})
    lens_cpu = torch.full((sh.b,), sh.t, dtype=torch.int32)
    work = Work(flops=F.decode_flops(lens_cpu, sh.hq, sh.dh, sh.window),
                bytes=F.decode_bytes(lens_cpu, sh.hq, sh.hkv, sh.dh, elt, sh.window), memory_bound=True)
    scale = 1.0 / math.sqrt(sh.dh)

    def build(name: str) -> Callable[[], object]:
        if "error" in x:
            raise x["error"]
        if not name.startswith("peer:"):
            from cacheaug_engine import decode_attention

            _check(name, ctx.device)
            return lambda: decode_attention(x["q"], x["k"], x["v"], x["lens"], softcap=sh.softcap,
                                            window=sh.window, backend=name)
        if name == "peer:sdpa":
            mask = _window_mask(x["lens"], sh.t, sh.window, ctx.device)
            return lambda: _sdpa_decode(x["q"], x["k"], x["v"], mask, scale)
        if name == "peer:flash_attn":
            return peers.flash_attn_decode(x["q"], x["k"], x["v"], x["lens"], sh.softcap, sh.window, scale)
        # flashinfer: each request's own pages
        peers.need_cuda(ctx.device, "FlashInfer")
        peers.import_peer("flashinfer")
        kpages = torch.cat([peers.to_pages(x["k"][b], PAGE) for b in range(sh.b)])
        vpages = torch.cat([peers.to_pages(x["v"][b], PAGE) for b in range(sh.b)])
        per = math.ceil(sh.t / PAGE)
        tables = [list(range(b * per, (b + 1) * per)) for b in range(sh.b)]
        last = [sh.t - (per - 1) * PAGE] * sh.b
        return peers.flashinfer_paged_decode(x["q"], kpages, vpages, tables, last, PAGE, sh.softcap,
                                             sh.window, scale)

    for name in names:
        note = "SDPA has no softcap: computed without it" if name == "peer:sdpa" and sh.softcap else None
        ctx.measure("decode_attention", name, sh.as_dict(), dtype,
                    lambda name=name: (build(name), None, work), note=note)


def run_cascade(ctx: BenchContext, shapes: list[DecodeShape], dtype: torch.dtype) -> None:
    names = [*OUR_BACKENDS, "peer:concat_sdpa", "peer:decode_copies", "peer:flash_attn",
             "peer:flashinfer_shared"]
    _section(ctx, "cascade_decode", shapes, dtype, names, _cascade_one)


def _cascade_one(ctx: BenchContext, sh: DecodeShape, dtype: torch.dtype, names: list[str]) -> None:
    elt = torch.finfo(dtype).bits // 8
    length = sh.suffix
    suffix_lens_cpu = torch.tensor([length - (b % 4) for b in range(sh.b)], dtype=torch.int32)
    x = _inputs(ctx, lambda g: {"q": _rnd(g, ctx.device, dtype, sh.b, sh.hq, sh.dh),
                                "ks": _rnd(g, ctx.device, dtype, sh.hkv, sh.t, sh.dh),
                                "vs": _rnd(g, ctx.device, dtype, sh.hkv, sh.t, sh.dh),
                                "kx": _rnd(g, ctx.device, dtype, sh.b, sh.hkv, length, sh.dh),
                                "vx": _rnd(g, ctx.device, dtype, sh.b, sh.hkv, length, sh.dh),
                                "lens": suffix_lens_cpu.to(ctx.device)})
    work = Work(flops=F.cascade_flops(sh.b, sh.t, suffix_lens_cpu, sh.hq, sh.dh),
                bytes=F.cascade_bytes(sh.b, sh.t, suffix_lens_cpu, sh.hq, sh.hkv, sh.dh, elt),
                memory_bound=True)
    scale = 1.0 / math.sqrt(sh.dh)

    def copies() -> tuple[Tensor, Tensor, Tensor]:
        kc = torch.cat([x["ks"].unsqueeze(0).expand(sh.b, -1, -1, -1), x["kx"]], dim=2)
        vc = torch.cat([x["vs"].unsqueeze(0).expand(sh.b, -1, -1, -1), x["vx"]], dim=2)
        return kc, vc, x["lens"].long() + sh.t

    def build(name: str) -> Callable[[], object]:
        if "error" in x:
            raise x["error"]
        if not name.startswith("peer:"):
            from cacheaug_engine import cascade_decode

            _check(name, ctx.device)
            return lambda: cascade_decode(x["q"], x["ks"], x["vs"], x["kx"], x["vx"], x["lens"],
                                          softcap=sh.softcap, window=sh.window, backend=name)
        if name == "peer:concat_sdpa":
            total = x["lens"].long() + sh.t
            mask = _window_mask(total, sh.t + length, sh.window, ctx.device)

            def run() -> Tensor:
                kc, vc, _ = copies()
                return _sdpa_decode(x["q"], kc, vc, mask, scale)
            return run
        if name == "peer:decode_copies":
            from cacheaug_engine import decode_attention
            from cacheaug_engine.ops.backends import resolve_backend

            be = resolve_backend("decode_attention", None, ctx.device)
            kc, vc, total = copies()
            return lambda: decode_attention(x["q"], kc, vc, total, softcap=sh.softcap, window=sh.window,
                                            backend=be)
        if name == "peer:flash_attn":
            peers.need_cuda(ctx.device, "flash-attn")
            peers.import_peer("flash_attn_interface", "flash_attn")
            kc, vc, total = copies()
            return peers.flash_attn_decode(x["q"], kc, vc, total, sh.softcap, sh.window, scale)
        peers.need_cuda(ctx.device, "FlashInfer")
        peers.import_peer("flashinfer")
        if sh.t % PAGE:
            raise Unavailable(f"shared prefix length {sh.t} is not a multiple of the page size {PAGE}")
        shared = math.ceil(sh.t / PAGE)
        per = math.ceil(length / PAGE)
        kpages = torch.cat([peers.to_pages(x["ks"], PAGE)] + [peers.to_pages(x["kx"][b], PAGE)
                                                              for b in range(sh.b)])
        vpages = torch.cat([peers.to_pages(x["vs"], PAGE)] + [peers.to_pages(x["vx"][b], PAGE)
                                                              for b in range(sh.b)])
        tables, last = [], []
        for b in range(sh.b):
            n_own = math.ceil(int(suffix_lens_cpu[b]) / PAGE)
            tables.append(list(range(shared)) + list(range(shared + b * per, shared + b * per + n_own)))
            last.append(int(suffix_lens_cpu[b]) - (n_own - 1) * PAGE)
        return peers.flashinfer_paged_decode(x["q"], kpages, vpages, tables, last, PAGE, sh.softcap,
                                             sh.window, scale)

    for name in names:
        note = None
        if name == "peer:concat_sdpa" and sh.softcap:
            note = "SDPA has no softcap: computed without it"
        ctx.measure("cascade_decode", name, sh.as_dict(), dtype,
                    lambda name=name: (build(name), None, work), note=note)


def run_merge(ctx: BenchContext, shapes: list[tuple[int, int, int]], dtype: torch.dtype) -> None:
    ctx.start_section("merge_states", len(shapes) * len(OUR_BACKENDS))
    for rows, dh, _ in shapes:
        _merge_one(ctx, rows, dh, dtype)
    ctx.close_section()


def _merge_one(ctx: BenchContext, rows: int, dh: int, dtype: torch.dtype) -> None:
    elt = torch.finfo(dtype).bits // 8
    x: dict[str, Any] = {}
    if not ctx.over_budget():
        g = torch.Generator().manual_seed(0)
        x = {"oa": _rnd(g, ctx.device, dtype, rows, dh), "ob": _rnd(g, ctx.device, dtype, rows, dh),
             "la": _rnd(g, ctx.device, torch.float32, rows), "lb": _rnd(g, ctx.device, torch.float32, rows)}
    work = Work(bytes=F.merge_bytes(rows, dh, elt), flops=float(rows * dh * 4), memory_bound=True)

    def build(name: str) -> Callable[[], object]:
        from cacheaug_engine import merge_states

        _check(name, ctx.device)
        return lambda: merge_states(x["oa"], x["la"], x["ob"], x["lb"], backend=name)

    for name in OUR_BACKENDS:
        ctx.measure("merge_states", name, {"rows": rows, "dh": dh}, dtype,
                    lambda name=name: (build(name), None, work))

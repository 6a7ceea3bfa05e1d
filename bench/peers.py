"""Third-party peers (flash-attn, FlashInfer) and plain-PyTorch peers (SDPA, naive loop).

Every builder either returns a zero-argument callable that runs the peer on prepared
tensors, or raises :class:`Unavailable` with the reason (not installed, no GPU, feature
missing). Layout conversions happen in the builder, outside the timed call; work that a
user of the peer would really have to do per call (gathering per-block keys,
concatenating a shared prefix per request) stays inside it.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .records import Unavailable


def import_peer(*names: str) -> Any:
    """First importable module among ``names``, else Unavailable naming each failure."""
    reasons = []
    for name in names:
        try:
            return importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - the reason is what we record
            reasons.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise Unavailable("; ".join(reasons))


def need_cuda(device: torch.device, who: str) -> None:
    if device.type != "cuda":
        raise Unavailable(f"{who} needs a CUDA GPU (running on {device.type})")


def eager_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, softcap: float | None
) -> Tensor:
    """Plain matmul-softmax attention (used where SDPA cannot apply a softcap). GQA by repeat."""
    g = q.shape[-3] // k.shape[-3]
    if g > 1:
        k = k.repeat_interleave(g, dim=-3)
        v = v.repeat_interleave(g, dim=-3)
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1).to(v.dtype), v)


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    gqa = q.shape[-3] != k.shape[-3]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


# --- segment attention peers -----------------------------------------------------------


def block_local_mask(p: int, s: int, causal: bool, window: int | None, device: torch.device) -> Tensor:
    from cacheaug_engine.ops.reference import segment_visibility

    return segment_visibility(p, s, causal=causal, window=window, device=device)


def dense_segment_mask(prefix_lens: Tensor, t: int, s: int, causal: bool, window: int | None) -> Tensor:
    """bool [B, 1, N*S, T + N*S]: the full mask over [prefix ; all block keys] (what SDPA needs).

    The flex backend's mask_mod evaluated on the whole (request, query, key) grid at once."""
    from cacheaug_engine.ops.flex_impl import segment_mask_mod

    b, n = prefix_lens.shape
    ns = n * s
    dev = prefix_lens.device
    mask_mod = segment_mask_mod(prefix_lens.long(), t, s, causal, window)
    rows = torch.arange(b, device=dev).view(b, 1, 1)
    q_idx = torch.arange(ns, device=dev).view(1, ns, 1)
    kv_idx = torch.arange(t + ns, device=dev).view(1, 1, t + ns)
    return mask_mod(rows, None, q_idx, kv_idx).unsqueeze(1)


def flash_attn_segment(
    q: Tensor, k: Tensor, v: Tensor, kp: Tensor, vp: Tensor, prefix_lens: Tensor, s: int,
    causal: bool, softcap: float | None, window: int | None, scale: float,
) -> Callable[[], Tensor]:
    """flash-attn varlen over per-block gathered keys [prefix[:p_k] ; block k] (gather is timed).

    flash-attn aligns causal masks bottom-right, so row i of block k sees keys j <= p_k + i:
    exactly the segment pattern. window_size=(window-1, 0) keeps keys > pos - window.
    """
    need_cuda(q.device, "flash-attn")
    mod = import_peer("flash_attn_interface", "flash_attn")
    fn = mod.flash_attn_varlen_func
    b, hq, ns, dh = q.shape
    n = ns // s
    lens = prefix_lens.cpu().tolist()
    idx_rows, cu_k = [], [0]
    t = kp.shape[2]
    for bi in range(b):
        for blk in range(n):
            p = int(lens[bi][blk])
            base = bi * (t + ns)
            idx_rows.append(torch.arange(base, base + p))
            idx_rows.append(torch.arange(base + t + blk * s, base + t + (blk + 1) * s))
            cu_k.append(cu_k[-1] + p + s)
    gather_idx = torch.cat(idx_rows).to(q.device)
    cu_q = torch.arange(0, b * ns + 1, s, dtype=torch.int32, device=q.device)
    cu_kt = torch.tensor(cu_k, dtype=torch.int32, device=q.device)
    max_k = int(max(cu_k[i + 1] - cu_k[i] for i in range(len(cu_k) - 1)))
    kw: dict[str, Any] = {"softmax_scale": scale, "causal": causal}
    if window is not None:
        kw["window_size"] = (window - 1, 0 if causal else -1)
    if softcap is not None:
        kw["softcap"] = softcap

    def run() -> Tensor:
        kc = torch.cat([kp, k], dim=2).transpose(1, 2).reshape(b * (t + ns), -1, dh)
        vc = torch.cat([vp, v], dim=2).transpose(1, 2).reshape(b * (t + ns), -1, dh)
        qq = q.transpose(1, 2).reshape(b * ns, hq, dh)
        kg, vg = kc.index_select(0, gather_idx), vc.index_select(0, gather_idx)
        out = fn(qq, kg, vg, cu_q, cu_kt, s, max_k, **kw)
        return out[0] if isinstance(out, tuple) else out

    return run


def flashinfer_segment(
    q: Tensor, k: Tensor, v: Tensor, kp: Tensor, vp: Tensor, prefix_lens: Tensor, s: int,
    causal: bool, softcap: float | None, window: int | None, scale: float,
) -> Callable[[], Tensor]:
    """FlashInfer single-request prefill over [prefix ; blocks] with the dense custom mask (B = 1)."""
    need_cuda(q.device, "FlashInfer")
    fi = import_peer("flashinfer")
    if q.shape[0] != 1:
        raise Unavailable("FlashInfer peer is written for B = 1")
    t = kp.shape[2]
    mask = dense_segment_mask(prefix_lens, t, s, causal, window)[0, 0].contiguous()
    qq = q[0].transpose(0, 1).contiguous()

    def run() -> Tensor:
        kc = torch.cat([kp[0], k[0]], dim=1).transpose(0, 1)
        vc = torch.cat([vp[0], v[0]], dim=1).transpose(0, 1)
        return fi.single_prefill_with_kv_cache(
            qq, kc, vc, custom_mask=mask, causal=False, sm_scale=scale, logits_soft_cap=softcap,
        )

    return run


# --- decode peers ------------------------------------------------------------------------


def flash_attn_decode(
    q: Tensor, k: Tensor, v: Tensor, lens: Tensor, softcap: float | None, window: int | None, scale: float,
) -> Callable[[], Tensor]:
    """flash_attn_with_kvcache on [B, Tmax, Hkv, Dh] caches (layout converted once, untimed)."""
    need_cuda(q.device, "flash-attn")
    mod = import_peer("flash_attn_interface", "flash_attn")
    fn = mod.flash_attn_with_kvcache
    kc = k.transpose(1, 2).contiguous()
    vc = v.transpose(1, 2).contiguous()
    qq = q.unsqueeze(1).contiguous()
    seqlens = lens.to(torch.int32)
    kw: dict[str, Any] = {"cache_seqlens": seqlens, "softmax_scale": scale, "causal": True}
    if window is not None:
        kw["window_size"] = (window - 1, 0)
    if softcap is not None:
        kw["softcap"] = softcap

    def run() -> Tensor:
        out = fn(qq, kc, vc, **kw)
        return out[0] if isinstance(out, tuple) else out

    return run


def flashinfer_paged_decode(
    q: Tensor, k: Tensor, v: Tensor, page_tables: list[list[int]], last_page_len: list[int], page_size: int,
    softcap: float | None, window: int | None, scale: float,
) -> Callable[[], Tensor]:
    """FlashInfer batch decode over a paged cache; k/v are already pages [P, page, Hkv, Dh].

    With shared pages (the same prefix page ids in every request's table) this is
    FlashInfer's way to decode n samples over one prompt without copying it.
    """
    need_cuda(q.device, "FlashInfer")
    fi = import_peer("flashinfer")
    dev = q.device
    ws = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=dev)
    wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
    indptr = [0]
    for tab in page_tables:
        indptr.append(indptr[-1] + len(tab))
    indices = torch.tensor([i for tab in page_tables for i in tab], dtype=torch.int32, device=dev)
    plan_kw: dict[str, Any] = {"pos_encoding_mode": "NONE", "sm_scale": scale, "logits_soft_cap": softcap,
                               "q_data_type": q.dtype, "kv_data_type": k.dtype}
    if window is not None:
        plan_kw["window_left"] = window - 1
    wrapper.plan(
        torch.tensor(indptr, dtype=torch.int32, device=dev), indices,
        torch.tensor(last_page_len, dtype=torch.int32, device=dev),
        q.shape[1], k.shape[2], q.shape[2], page_size, **plan_kw,
    )
    cache = (k, v)
    return lambda: wrapper.run(q, cache)


def to_pages(x: Tensor, page_size: int) -> Tensor:
    """[Hkv, L, Dh] -> [ceil(L/page), page, Hkv, Dh] (zero padded)."""
    hkv, length, dh = x.shape
    n_pages = math.ceil(length / page_size)
    pad = n_pages * page_size - length
    if pad:
        x = torch.cat([x, x.new_zeros(hkv, pad, dh)], dim=1)
    return x.view(hkv, n_pages, page_size, dh).permute(1, 2, 0, 3).contiguous()

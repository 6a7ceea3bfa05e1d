"""The `torch` backend: vectorised PyTorch for the CPU (and any device).

Unlike reference.py (one block at a time, for clarity), these batch all blocks and
requests and skip the invisible work that matters most: blocks never score each other's
keys (block-local [S, S] scores instead of [N*S, N*S]), prefix keys past max(p_k) are
never read, and the shared cascade prefix is never expanded per request. Gradients
come from autograd (prefix gradients too, if a caller asks for them).

Invisible keys (contract: reference.finite_keys): keys and values pass through reference.finite_keys,
so a key a row cannot see never reaches it, even as 0 x NaN inside a batched einsum, and
a key holding NaN/Inf makes exactly the rows that see it NaN.
"""

from __future__ import annotations

import math
from typing import overload

import torch
import torch.nn.functional as F
from torch import Tensor

from cacheaug_engine.ops.reference import compute_dtype, finite_keys, lse_dtype, softcap_scores


def _mask_scores(scores: Tensor, bad: Tensor, hidden: Tensor, softcap: float | None) -> Tensor:
    """Softcap, NaN where a key holds a non-finite value, then -inf where the key is hidden from the row:
    scores are overwritten, never added to (an overflowed hidden score + -inf would be NaN). Hidden
    scores are zeroed before the softcap, so its derivative never meets an overflowed (inf / NaN)
    hidden score: 0 x NaN would carry a hidden key into dq."""
    if softcap is not None:
        scores = softcap_scores(scores.masked_fill(hidden, 0.0), softcap)
    return scores.masked_fill(bad, float("nan")).masked_fill_(hidden, float("-inf"))


@overload
def _softmax_rows(
    scores: Tensor, bad: Tensor, hidden: Tensor, *, softcap: float | None = None
) -> tuple[Tensor, Tensor]: ...
@overload
def _softmax_rows(
    scores: Tensor, bad: Tensor, hidden: Tensor, with_lse: bool, *, softcap: float | None = None
) -> tuple[Tensor, Tensor | None]: ...
def _softmax_rows(
    scores: Tensor, bad: Tensor, hidden: Tensor, with_lse: bool = True, *, softcap: float | None = None
) -> tuple[Tensor, Tensor | None]:
    """Masked softmax of raw scores along the last dim (softcap applied here) -> (probs, lse or None).

    Hidden probabilities are 0 even in a row that sees a bad key (NaN throughout): 0, not NaN,
    must reach the dv / dk of keys that row cannot see. With lse, a row with nothing visible gives
    p = 0 and lse = -inf; without, every row must see a key (a plain fused softmax).
    """
    scores = _mask_scores(scores, bad, hidden, softcap)
    if not with_lse:
        return torch.softmax(scores, dim=-1).masked_fill(hidden, 0.0), None
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - safe).masked_fill(hidden, 0.0)
    return probs, lse.squeeze(-1)


def _blocks_sdpa(q: Tensor, k: Tensor, v: Tensor, *, block_len: int, causal: bool, scale: float) -> Tensor:
    """segment_attention with no prefix and no window (e.g. prefill): per-block attention by SDPA.

    Blocks become a batch dim, 4-D [B*N, H, S, Dh]: with 5-D inputs (or a GQA expand) CPU SDPA
    falls back to its math kernel (~8x slower at S = 256 than its fused flash kernel). SDPA
    cannot score a key NaN, so keys are sanitised first (a row never meets an invisible key's
    memory, not even as 0 x NaN) and the rows that see a key that held a non-finite value are
    set NaN afterwards, without a host sync (contract: reference.finite_keys).
    """
    b, hq, ns, dh = q.shape
    hkv, s = k.shape[1], block_len
    g, n = hq // hkv, ns // s
    ct = compute_dtype(q.dtype)

    def fold(x: Tensor, heads: int) -> Tensor:
        return x.reshape(b, heads, n, s, dh).transpose(1, 2).reshape(b * n, heads, s, dh).to(ct)

    # sanitised after folding: the same memory layout (hence the same SDPA kernel and rounding)
    # as clean keys get; bad is [B*N, Hkv, S]
    kf, vf, bad = finite_keys(fold(k, hkv), fold(v, hkv))
    out = F.scaled_dot_product_attention(fold(q, hq), kf, vf, scale=scale, enable_gqa=g > 1, is_causal=causal)
    # causal: row i sees keys <= i, so it is hit once any of them is bad; else every row sees all
    hit = bad.cummax(-1).values if causal else bad.any(-1, keepdim=True)
    out, hit = out.view(b * n, hkv, g, s, dh), hit.view(b * n, hkv, 1, -1, 1)
    # in place on SDPA's fresh output unless autograd needs it (saves a copy of o per layer)
    out = out.masked_fill(hit, float("nan")) if out.requires_grad else out.masked_fill_(hit, float("nan"))
    return out.view(b, n, hq, s, dh).transpose(1, 2).reshape(b, hq, ns, dh).to(q.dtype)


def _segment_invisible(
    prefix_lens: Tensor, t_used: int, s: int, causal: bool, window: int | None
) -> Tensor:
    """bool [B, 1, 1, N, S, t_used + S]: key j (prefix entries, then the block's own S keys) is
    invisible to row i of block k. Index data only: built once per pass (the plan keeps it)."""
    b, n = prefix_lens.shape
    dev = prefix_lens.device
    rows = torch.arange(s, device=dev)
    starts = prefix_lens.long().view(b, 1, 1, n, 1, 1)
    key_pos = torch.arange(t_used, device=dev).view(1, 1, 1, 1, 1, t_used)
    hide_prefix = key_pos >= starts
    hide_local = torch.zeros(s, s, dtype=torch.bool, device=dev)
    if causal:
        hide_local = rows.view(1, s) > rows.view(s, 1)
    if window is not None:
        row_pos = starts + rows.view(1, 1, 1, 1, s, 1)  # absolute position of each query row
        hide_prefix = hide_prefix | (key_pos <= row_pos - window)
        hide_local = hide_local | (rows.view(1, s) <= rows.view(s, 1) - window)
    return torch.cat(
        [hide_prefix.expand(b, 1, 1, n, s, t_used), hide_local.view(1, 1, 1, 1, s, s).expand(b, 1, 1, n, s, s)],
        dim=-1,
    )


def segment_attention(
    q: Tensor, k: Tensor, v: Tensor, k_prefix: Tensor, v_prefix: Tensor, prefix_lens: Tensor,
    *, block_len: int, causal: bool = True, softcap: float | None = None, window: int | None = None,
    scale: float | None = None, return_lse: bool = False, max_prefix_len: int | None = None,
    mask_cache: dict[str, Tensor] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    b, hq, ns, dh = q.shape
    hkv = k.shape[1]
    g, s = hq // hkv, block_len
    n = ns // s
    ct = compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(dh) if scale is None else scale
    # max(p_k) comes from the plan (ops/plan.py: read back once per pass, not per layer); without
    # one, all T keys are scored and the invisible ones masked.
    t_used = k_prefix.shape[2] if max_prefix_len is None else max_prefix_len
    if t_used == 0 and softcap is None and not return_lse and window is None:
        # SDPA only where no invisible key can reach a row through it: a huge finite key (q.k
        # overflowing to inf) meets the kernel's additive window mask as inf + -inf = NaN, and the
        # causal backward's dS = P * (dP - D) as 0 x inf from a huge v; the explicit path below
        # overwrites those scores and probabilities instead (tests/ops/test_poison.py).
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if not (causal and grad):
            return _blocks_sdpa(q, k, v, block_len=s, causal=causal, scale=scale)

    # the plan's masks (one per pass), else built here
    invisible = None if mask_cache is None else mask_cache.get("invisible")
    if invisible is None:
        invisible = _segment_invisible(prefix_lens.to(q.device), t_used, s, causal, window)
        if mask_cache is not None:
            mask_cache["invisible"] = invisible

    qg = q.reshape(b, hkv, g, n, s, dh).to(ct)
    kl = k.reshape(b, hkv, n, s, dh).to(ct)
    vl = v.reshape(b, hkv, n, s, dh).to(ct)
    kp = k_prefix[:, :, :t_used].to(ct)
    vp = v_prefix[:, :, :t_used].to(ct)
    kp, vp, bad_p = finite_keys(kp, vp)
    kl, vl, bad_l = finite_keys(kl, vl)
    s_prefix = torch.einsum("bhgnsd,bhtd->bhgnst", qg, kp) * scale
    s_local = torch.einsum("bhgnsd,bhnjd->bhgnsj", qg, kl) * scale
    scores = torch.cat([s_prefix, s_local], dim=-1)
    bad = torch.cat(
        [bad_p.view(b, hkv, 1, 1, 1, t_used).expand(b, hkv, 1, n, 1, t_used), bad_l.view(b, hkv, 1, n, 1, s)],
        dim=-1,
    )
    # segment rows always see their own key: the plain softmax serves when lse is not asked for
    probs, lse = _softmax_rows(scores, bad, invisible, with_lse=return_lse, softcap=softcap)
    out = torch.einsum("bhgnst,bhtd->bhgnsd", probs[..., :t_used], vp)
    out = out + torch.einsum("bhgnsj,bhnjd->bhgnsd", probs[..., t_used:], vl)
    out = out.reshape(b, hq, ns, dh).to(q.dtype)
    if lse is not None:
        return out, lse.reshape(b, hq, ns).to(lse_dtype(q.dtype))
    return out


def _decode_scores(q: Tensor, k: Tensor, scale: float, shared: bool) -> Tensor:
    """q [B, Hkv, G, Dh] against k [B, Hkv, L, Dh] (or [Hkv, L, Dh] when shared) -> raw scores [B, Hkv, G, L]."""
    eq = "bhgd,hld->bhgl" if shared else "bhgd,bhld->bhgl"
    return torch.einsum(eq, q, k.to(q.dtype)) * scale


def decode_attention(
    q: Tensor, k: Tensor, v: Tensor, lens: Tensor, *, softcap: float | None = None,
    window: int | None = None, scale: float | None = None, return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    b, hq, dh = q.shape
    hkv, tmax = k.shape[1], k.shape[2]
    ct = compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(dh) if scale is None else scale
    qg = q.reshape(b, hkv, hq // hkv, dh).to(ct)
    k, v, bad = finite_keys(k.to(ct), v.to(ct))
    pos = torch.arange(tmax, device=q.device).view(1, 1, 1, tmax)
    n = lens.to(q.device).long().view(b, 1, 1, 1)
    visible = pos < n
    if window is not None:
        visible = visible & (pos > n - 1 - window)
    scores = _decode_scores(qg, k, scale, shared=False)
    probs, lse = _softmax_rows(scores, bad.unsqueeze(2), ~visible, softcap=softcap)
    out = torch.einsum("bhgl,bhld->bhgd", probs, v).reshape(b, hq, dh).to(q.dtype)
    lse = lse.reshape(b, hq).to(lse_dtype(q.dtype))
    return (out, lse) if return_lse else out


def cascade_decode(
    q: Tensor, k_shared: Tensor, v_shared: Tensor, k_suffix: Tensor, v_suffix: Tensor,
    suffix_lens: Tensor, *, softcap: float | None = None, window: int | None = None,
    scale: float | None = None, return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    b, hq, dh = q.shape
    hkv, t = k_shared.shape[0], k_shared.shape[1]
    length = k_suffix.shape[2]
    ct = compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(dh) if scale is None else scale
    qg = q.reshape(b, hkv, hq // hkv, dh).to(ct)
    k_shared, v_shared, bad_s = finite_keys(k_shared.to(ct), v_shared.to(ct))
    k_suffix, v_suffix, bad_x = finite_keys(k_suffix.to(ct), v_suffix.to(ct))
    n = suffix_lens.to(q.device).long().view(b, 1, 1, 1)
    q_pos = t + n - 1
    pos = torch.arange(t + length, device=q.device).view(1, 1, 1, t + length)
    visible = (pos < t) | (pos - t < n)
    if window is not None:
        visible = visible & (pos > q_pos - window)
    scores = torch.cat(
        [
            _decode_scores(qg, k_shared, scale, shared=True),
            _decode_scores(qg, k_suffix, scale, shared=False),
        ],
        dim=-1,
    )
    bad = torch.cat([bad_s.unsqueeze(0).expand(b, hkv, t), bad_x], dim=-1).unsqueeze(2)
    probs, lse = _softmax_rows(scores, bad, ~visible, softcap=softcap)
    out = torch.einsum("bhgl,hld->bhgd", probs[..., :t], v_shared)
    out = out + torch.einsum("bhgl,bhld->bhgd", probs[..., t:], v_suffix)
    out = out.reshape(b, hq, dh).to(q.dtype)
    lse = lse.reshape(b, hq).to(lse_dtype(q.dtype))
    return (out, lse) if return_lse else out

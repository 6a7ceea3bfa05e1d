"""Plain PyTorch ground truth for every op (contracts: the op docstrings in ops/__init__.py).

Written for clarity, not speed: one block / one request at a time, explicit masks,
math in float32 (or float64 when the inputs are float64). Every fast backend is tested
against these functions. Gradients come from autograd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Math runs in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """lse is float32, except float64 inputs keep float64 so the ground truth stays exact."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softcap_scores(scores: Tensor, softcap: float | None) -> Tensor:
    """Gemma-2 style c * tanh(s / c), or s unchanged when softcap is None."""
    if softcap is None:
        return scores
    return softcap * torch.tanh(scores / softcap)


def finite_keys(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(k, v with non-finite entries zeroed, bool [..., L]: key l holds a non-finite k or v).

    The attention ops score such a key NaN before masking: a row that sees it turns NaN (a
    visible NaN is never hidden), while a row that cannot see it never meets its memory -
    not even as 0 x NaN in the probability-weighted sum or in a gradient (the guarantee
    FlashAttention and FlashInfer give). k, v: [..., L, Dh].
    """
    # x * 0 is exactly 0 for every finite x (however large: no overflow, unlike a plain sum) and
    # NaN for NaN/Inf, so a key's row sum of it is NaN exactly when the key holds one (6 ops: every
    # layer of the torch backend pays this)
    bad = torch.isnan((k * 0).sum(-1) + (v * 0).sum(-1))
    clean = [torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) for x in (k, v)]
    return clean[0], clean[1], bad


def _expand_kv(x: Tensor, group: int) -> Tensor:
    """[..., Hkv, L, Dh] -> [..., Hkv * group, L, Dh]: query head h uses KV head h // group."""
    return x.repeat_interleave(group, dim=-3)


def _masked_attention(
    q: Tensor, k: Tensor, v: Tensor, visible: Tensor, scale: float, softcap: float | None
) -> tuple[Tensor, Tensor]:
    """q [H, M, Dh], k/v [H, L, Dh], visible bool [M, L] -> (o [H, M, Dh], lse [H, M]).

    A key with a non-finite k or v makes every row that sees it NaN; rows that cannot see it
    are exactly as if its memory were clean, forward and backward (see finite_keys).
    """
    k, v, bad = finite_keys(k, v)
    scores = softcap_scores(torch.einsum("hmd,hld->hml", q, k) * scale, softcap)
    scores = scores.masked_fill(bad.unsqueeze(-2), float("nan")).masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # A row with no visible key (only possible in decode ops with length 0) gives o = 0.
    probs = torch.exp(scores - lse.unsqueeze(-1).masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0))
    probs = probs.masked_fill(~visible, 0.0)
    return torch.einsum("hml,hld->hmd", probs, v), lse


def segment_visibility(
    prefix_len: int, block_len: int, *, causal: bool = True, window: int | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Boolean mask [S, p + S] of one block: row i (position p + i) over [prefix ; block keys]."""
    p, s = prefix_len, block_len
    row_pos = p + torch.arange(s, device=device).unsqueeze(1)
    key_pos = torch.arange(p + s, device=device).unsqueeze(0)
    local = key_pos >= p
    visible = torch.ones(s, p + s, dtype=torch.bool, device=device)
    if causal:
        visible &= ~local | (key_pos <= row_pos)
    if window is not None:
        visible &= key_pos > row_pos - window
    return visible


def segment_attention(
    q: Tensor, k: Tensor, v: Tensor, k_prefix: Tensor, v_prefix: Tensor, prefix_lens: Tensor,
    *, block_len: int, causal: bool = True, softcap: float | None = None, window: int | None = None,
    scale: float | None = None, return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Reference segment attention. Shapes and semantics: see ops.segment_attention."""
    b, hq, ns, dh = q.shape
    hkv = k.shape[1]
    s = block_len
    n = ns // s
    scale = 1.0 / math.sqrt(dh) if scale is None else scale
    ct = compute_dtype(q.dtype)
    group = hq // hkv
    lens = prefix_lens.tolist()
    outs, lses = [], []
    for bi in range(b):
        row_o, row_l = [], []
        for blk in range(n):
            p = int(lens[bi][blk])
            rows = slice(blk * s, (blk + 1) * s)
            keys = torch.cat([k_prefix[bi, :, :p], k[bi, :, rows]], dim=1).to(ct)
            vals = torch.cat([v_prefix[bi, :, :p], v[bi, :, rows]], dim=1).to(ct)
            visible = segment_visibility(p, s, causal=causal, window=window, device=q.device)
            o_blk, l_blk = _masked_attention(
                q[bi, :, rows].to(ct), _expand_kv(keys, group), _expand_kv(vals, group), visible, scale, softcap
            )
            row_o.append(o_blk)
            row_l.append(l_blk)
        outs.append(torch.cat(row_o, dim=1))
        lses.append(torch.cat(row_l, dim=1))
    out = torch.stack(outs).to(q.dtype)
    lse = torch.stack(lses).to(lse_dtype(q.dtype))
    return (out, lse) if return_lse else out


def decode_attention(
    q: Tensor, k: Tensor, v: Tensor, lens: Tensor, *, softcap: float | None = None,
    window: int | None = None, scale: float | None = None, return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Reference one-token decode. q [B, Hq, Dh]; k, v [B, Hkv, Tmax, Dh]; lens int [B].

    Request b attends to keys [0, lens[b]); its query sits at position lens[b] - 1 (the
    window counts back from there). A request with lens[b] = 0 gives o = 0, lse = -inf.
    """
    b, hq, dh = q.shape
    group = hq // k.shape[1]
    scale = 1.0 / math.sqrt(dh) if scale is None else scale
    ct = compute_dtype(q.dtype)
    outs, lses = [], []
    for bi, length in enumerate(lens.tolist()):
        key_pos = torch.arange(length, device=q.device)
        visible = torch.ones(1, length, dtype=torch.bool, device=q.device)
        if window is not None:
            visible &= (key_pos > length - 1 - window).unsqueeze(0)
        o, l = _masked_attention(
            q[bi].unsqueeze(1).to(ct),
            _expand_kv(k[bi, :, :length].to(ct), group),
            _expand_kv(v[bi, :, :length].to(ct), group),
            visible, scale, softcap,
        )
        outs.append(o.squeeze(1))
        lses.append(l.squeeze(1))
    out = torch.stack(outs).to(q.dtype)
    lse = torch.stack(lses).to(lse_dtype(q.dtype))
    return (out, lse) if return_lse else out


def cascade_decode(
    q: Tensor, k_shared: Tensor, v_shared: Tensor, k_suffix: Tensor, v_suffix: Tensor,
    suffix_lens: Tensor, *, softcap: float | None = None, window: int | None = None,
    scale: float | None = None, return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Reference decode over one shared prefix plus a per-request suffix.

    q [B, Hq, Dh]; k_shared, v_shared [Hkv, T, Dh] (the same prompt cache for every
    request); k_suffix, v_suffix [B, Hkv, L, Dh] with suffix_lens int [B] in [0, L].
    Request b sees all T shared keys then its first suffix_lens[b] suffix keys; its
    query sits at position T + suffix_lens[b] - 1. Computed on explicitly concatenated
    keys, which is exactly what the fast kernels avoid.
    """
    b = q.shape[0]
    t = k_shared.shape[1]
    k_cat = torch.cat([k_shared.unsqueeze(0).expand(b, -1, -1, -1), k_suffix], dim=2)
    v_cat = torch.cat([v_shared.unsqueeze(0).expand(b, -1, -1, -1), v_suffix], dim=2)
    return decode_attention(
        q, k_cat, v_cat, suffix_lens.long() + t, softcap=softcap, window=window, scale=scale,
        return_lse=return_lse,
    )


def merge_states(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Exact merge of two partial softmax attentions over disjoint key sets.

    o_* [..., Dh] with lse_* [...] (fp32, or fp64 for fp64 o; natural log). An empty part has lse = -inf and
    contributes nothing, whatever its o holds; two empty parts give o = 0, lse = -inf. A NaN
    (or +inf) lse is not an empty part: it gives o = NaN and lse = NaN (+inf), never a silent 0.
    """
    ct = compute_dtype(o_a.dtype)
    la, lb = lse_a.to(ct), lse_b.to(ct)
    lse = torch.logaddexp(la, lb)
    neg_inf = float("-inf")
    safe = torch.where(lse == neg_inf, torch.zeros_like(lse), lse)
    parts = []
    for l_x, o_x in ((la, o_a), (lb, o_b)):
        w = torch.exp(l_x - safe).unsqueeze(-1)  # NaN when lse is NaN or +inf
        parts.append(torch.where((l_x == neg_inf).unsqueeze(-1), 0.0, w * o_x.to(ct)))
    o = parts[0] + parts[1]
    return o.to(o_a.dtype), lse.to(lse_dtype(o_a.dtype))

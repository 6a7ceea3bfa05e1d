"""An independent dense formulation of the ops, for testing the reference itself.

Keys are explicitly concatenated ([prefix ; all blocks]) and an explicit boolean mask is
built element by element from the contract in ops.segment_attention's docstring
(cacheaug_engine/ops/__init__.py); attention is SDPA (or plain math when
softcap is set, which SDPA does not support).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def segment_mask(prefix_lens: torch.Tensor, t: int, s: int, causal: bool, window: int | None) -> torch.Tensor:
    """Bool [B, N*S, T + N*S]: True where a query row may see a key."""
    b, n = prefix_lens.shape
    mask = torch.zeros(b, n * s, t + n * s, dtype=torch.bool)
    for bi in range(b):
        for r in range(n * s):
            blk, i = divmod(r, s)
            p = int(prefix_lens[bi, blk])
            q_pos = p + i
            for c in range(t + n * s):
                if c < t:
                    visible, k_pos = c < p, c
                else:
                    kb, j = divmod(c - t, s)
                    visible = kb == blk and (j <= i or not causal)
                    k_pos = p + j
                if window is not None and k_pos <= q_pos - window:
                    visible = False
                mask[bi, r, c] = visible
    return mask


def dense_attention(q, k, v, mask, scale=None, softcap=None):
    """q [B,Hq,M,Dh], k/v [B,Hkv,L,Dh], mask bool [B,M,L] -> (o, lse)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    if softcap is None:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)
    else:
        o = torch.softmax(scores, dim=-1) @ v
    return o, lse

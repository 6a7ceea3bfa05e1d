"""Run a decode / cascade call on the emulated CUDA library and check it against the reference."""

from __future__ import annotations

import math

import emu_ops
import torch
from decode_cases import check_nonfinite

from cacheaug_engine.ops import reference, torch_impl

FWD, REV = "fwd-deferred", "rev-immediate"  # the two schedules (emu_ops.SCHEDULES)
SCHEDULES = [FWD, REV]


def cascade_reference64(q, ks, vs, kx, vx, sl, *, softcap=None, window=None, scale=None):
    """reference.cascade_decode in float64, batched and without copying the shared prefix for
    every request (reference.py builds [B, Hq, T + L, Dh]: gigabytes for the big GPU cases).
    The same math - reference.finite_keys, softcap_scores, window, empty rows; decode is the
    case T = 0. test_emulated_cuda.test_reference64_matches_reference pins it to reference.py."""
    b, hq, dh = q.shape
    hkv, t, length = ks.shape[0], ks.shape[1], kx.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(dh) if scale is None else scale
    q64 = q.double().reshape(b, hkv, g, dh)
    ks_c, vs_c, bad_s = reference.finite_keys(ks.double(), vs.double())
    kx_c, vx_c, bad_x = reference.finite_keys(kx.double(), vx.double())
    scores = torch.cat([torch.einsum("bkgd,ktd->bkgt", q64, ks_c), torch.einsum("bkgd,bkld->bkgl", q64, kx_c)], -1)
    scores = reference.softcap_scores(scores * scale, softcap)
    bad = torch.cat([bad_s.unsqueeze(0).expand(b, -1, -1), bad_x], -1)[:, :, None, :]
    pos, n = torch.arange(t + length), sl.long().cpu() + t
    visible = pos[None] < n[:, None]
    if window is not None:
        visible &= pos[None] > (n - 1 - window)[:, None]
    visible = visible[:, None, None, :]
    scores = scores.masked_fill(bad, float("nan")).masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1).masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0))
    probs = probs.masked_fill(~visible, 0.0)
    o = torch.einsum("bkgt,ktd->bkgd", probs[..., :t], vs_c) + torch.einsum("bkgl,bkld->bkgd", probs[..., t:], vx_c)
    return o.reshape(b, hq, dh), lse.reshape(b, hq)


def decode_reference64(q, k, v, lens, **opts):
    """reference.decode_attention in float64 (cascade_reference64 with no shared prefix)."""
    empty = k.new_zeros(k.shape[1], 0, k.shape[3])
    return cascade_reference64(q, empty, empty, k, v, lens, **opts)


def decode_emu(q, k, v, lens, schedule, **opts):
    """(o, lse, raw result) of the emulated ca_decode_attention."""
    return emu_ops.run(emu_ops.decode_call(q, k, v, lens, schedule=schedule, **opts))


def cascade_emu(q, ks, vs, kx, vx, sl, schedule, **opts):
    return emu_ops.run(emu_ops.cascade_call(q, ks, vs, kx, vx, sl, schedule=schedule, **opts))


def check_decode_emu(q, k, v, lens, schedule, *, num_splits=0, o=None, lse=None, **opts):
    o, lse_, res = decode_emu(q, k, v, lens, schedule, num_splits=num_splits, o=o, lse=lse, **opts)
    ref_o, ref_l = decode_reference64(q, k, v, lens, **opts)
    t_o, t_l = torch_impl.decode_attention(q, k, v, lens, return_lse=True, **opts)
    check_nonfinite(o, lse_, ref_o, ref_l, t_o, t_l, q.dtype)
    return res


def check_cascade_emu(q, ks, vs, kx, vx, sl, schedule, *, num_splits=0, o=None, lse=None, **opts):
    o, lse_, res = cascade_emu(q, ks, vs, kx, vx, sl, schedule, num_splits=num_splits, o=o, lse=lse, **opts)
    ref_o, ref_l = cascade_reference64(q, ks, vs, kx, vx, sl, **opts)
    t_o, t_l = torch_impl.cascade_decode(q, ks, vs, kx, vx, sl, return_lse=True, **opts)
    check_nonfinite(o, lse_, ref_o, ref_l, t_o, t_l, q.dtype)
    return res

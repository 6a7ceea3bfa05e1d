"""Run a decode / cascade call on the emulated CUDA library and check it against the reference."""

from __future__ import annotations

import emu_ops
from decode_cases import check_nonfinite

from cacheaug_engine import reference
from cacheaug_engine.ops import torch_impl

FWD, REV = "fwd-deferred", "rev-immediate"  # the two schedules (emu_ops.SCHEDULES)
SCHEDULES = [FWD, REV]


def decode_emu(q, k, v, lens, schedule, **opts):
    """(o, lse, raw result) of the emulated ca_decode_attention."""
    return emu_ops.run(emu_ops.decode_call(q, k, v, lens, schedule=schedule, **opts))


def cascade_emu(q, ks, vs, kx, vx, sl, schedule, **opts):
    return emu_ops.run(emu_ops.cascade_call(q, ks, vs, kx, vx, sl, schedule=schedule, **opts))


def check_decode_emu(q, k, v, lens, schedule, *, num_splits=0, o=None, lse=None, **opts):
    o, lse_, res = decode_emu(q, k, v, lens, schedule, num_splits=num_splits, o=o, lse=lse, **opts)
    ref_o, ref_l = reference.decode_attention(q.double(), k.double(), v.double(), lens, return_lse=True, **opts)
    t_o, t_l = torch_impl.decode_attention(q, k, v, lens, return_lse=True, **opts)
    check_nonfinite(o, lse_, ref_o, ref_l, t_o, t_l, q.dtype)
    return res


def check_cascade_emu(q, ks, vs, kx, vx, sl, schedule, *, num_splits=0, o=None, lse=None, **opts):
    o, lse_, res = cascade_emu(q, ks, vs, kx, vx, sl, schedule, num_splits=num_splits, o=o, lse=lse, **opts)
    d = [x.double() for x in (q, ks, vs, kx, vx)]
    ref_o, ref_l = reference.cascade_decode(*d, sl, return_lse=True, **opts)
    t_o, t_l = torch_impl.cascade_decode(q, ks, vs, kx, vx, sl, return_lse=True, **opts)
    check_nonfinite(o, lse_, ref_o, ref_l, t_o, t_l, q.dtype)
    return res

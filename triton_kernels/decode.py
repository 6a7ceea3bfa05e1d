"""The `triton` backend of the decode ops: split-KV flash-decoding, cascade, merge.

    decode_attention  q [B,Hq,Dh] over k,v [B,Hkv,Tmax,Dh] with lens [B]
    cascade_decode    q over a shared prefix [Hkv,T,Dh] (read once per step for a tile
                      of requests) then each request's suffix [B,Hkv,L,Dh]
    merge_states      exact log-sum-exp merge of two partial attentions

One kernel, `_partial_kernel`, computes attention of R query rows over one chunk of one
key segment and writes a normalised partial output plus its lse (fp32). Its rows are the
G = Hq/Hkv query heads of one KV head for BB requests, so every K/V block it loads is
used by all heads of the group (GQA) and, for the shared cascade prefix (batch stride 0),
by BB requests at once. A second kernel, `_reduce_kernel`, merges the partial states of
all chunks (and, for cascade, of both segments) exactly through log-sum-exp.

Math is fp32 with elementwise products + tl.sum (decode has one query row per head, so
tensor-core dots buy little, and this also sidesteps the interpreter's broken bf16
tl.dot). Every tensor is addressed through its element strides; nothing is copied.

Split heuristic (`num_splits`): aim for about `_WAVES` programs per SM, but never give a
split fewer than `_MIN_CHUNK` keys and never more than `_MAX_SPLITS` splits. The split
size depends only on Tmax (not on the lens values), so the op never syncs with the host.
"""

from __future__ import annotations

import math
import os
from functools import cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import tanh
from .host import default_scale, public_decode_ops

_MIN_CHUNK = 256
_MAX_SPLITS = 64
_WAVES = 2


@triton.jit
def _partial_kernel(
    Q,
    K,
    V,
    LENS,
    PO,
    PL,
    sqb,
    sqh,
    sqd,
    skb,
    skh,
    skt,
    skd,
    svb,
    svh,
    svt,
    svd,
    spb,
    sph,
    sps,
    spd,
    slb,
    slh,
    sls,
    slen,
    B,
    HKV,
    SEG_T,
    CHUNK,
    SPLIT_OFF,
    QBASE,
    POS_OFF,
    WINDOW,
    scale,
    softcap,
    LENS_IS_SEG: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    G: tl.constexpr,
    BB: tl.constexpr,
    R: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Rows = BB requests x G heads of KV head `hkv`; keys = chunk `split` of the segment.

    Request b's segment length is LENS[b] (LENS_IS_SEG) or SEG_T; its query sits at
    absolute position QBASE + LENS[b] - 1 and segment key j at POS_OFF + j (window).
    Writes o (normalised, fp32) to PO[b, h, SPLIT_OFF + split] and lse to PL (-inf if empty).
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    hkv = pid % HKV
    b0 = (pid // HKV) * BB
    rows = tl.arange(0, R)
    rb = b0 + rows // G
    hq = hkv * G + rows % G
    row_ok = (rows < BB * G) & (rb < B)
    lens_b = tl.load(LENS + rb * slen, mask=row_ok, other=0).to(tl.int64)
    if LENS_IS_SEG:
        seg_len = lens_b
    else:
        seg_len = tl.zeros([R], dtype=tl.int64) + SEG_T
    seg_len = tl.where(row_ok, seg_len, 0)
    qpos = QBASE + lens_b - 1

    lo = split.to(tl.int64) * CHUNK
    hi = tl.minimum(lo + CHUNK, tl.max(seg_len, axis=0))
    if HAS_WINDOW:
        # segment index of the first visible key of each row; skip blocks before all of them
        first = tl.where(row_ok, qpos - WINDOW + 1 - POS_OFF, 1 << 60)
        lo = tl.maximum(lo, tl.min(first, axis=0))

    d = tl.arange(0, DP)
    dmask = d < D
    q = tl.load(
        Q + rb[:, None] * sqb + hq[:, None] * sqh + d[None, :] * sqd,
        mask=row_ok[:, None] & dmask[None, :],
        other=0.0,
    ).to(tl.float32)
    kbase = K + b0.to(tl.int64) * skb + hkv.to(tl.int64) * skh
    vbase = V + b0.to(tl.int64) * svb + hkv.to(tl.int64) * svh

    m_i = tl.full([R], float("-inf"), tl.float32)
    l_i = tl.zeros([R], tl.float32)
    acc = tl.zeros([R, DP], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nmask = n < hi
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(kbase + n[:, None] * skt + d[None, :] * skd, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(vbase + n[:, None] * svt + d[None, :] * svd, mask=kv_mask, other=0.0).to(tl.float32)
        # A tile of the shared prefix serves requests whose windows differ: a key one row cannot
        # see may be visible to another. Non-finite entries are zeroed (no 0 x NaN for the rows
        # that cannot see them) and their key scores NaN for the rows that can (reference.finite_keys).
        v_bad = tl.sum(v * 0.0, axis=1) != 0.0  # x * 0 is NaN exactly for a NaN/Inf x
        v = tl.where(v * 0.0 == 0.0, v, 0.0)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
        s = tl.where((s * 0.0 == 0.0) & ~v_bad[None, :], s, float("nan"))
        if HAS_SOFTCAP:
            s = softcap * tanh(s / softcap)
        vis = (n[None, :] < seg_len[:, None]) & nmask[None, :]
        if HAS_WINDOW:
            vis = vis & ((POS_OFF + n)[None, :] > (qpos - WINDOW)[:, None])
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new

    nonempty = l_i != 0.0  # NaN (a row that saw a non-finite key) stays NaN, never "empty"
    lse = tl.where(nonempty, m_i + tl.log(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    slot = SPLIT_OFF + split
    tl.store(PL + rb * slb + hq * slh + slot * sls, lse, mask=row_ok)
    tl.store(
        PO + rb[:, None] * spb + hq[:, None] * sph + slot * sps + d[None, :] * spd,
        o,
        mask=row_ok[:, None] & dmask[None, :],
    )


@triton.jit
def _reduce_kernel(
    PO,
    PL,
    O,
    LSE,
    spb,
    sph,
    sps,
    spd,
    slb,
    slh,
    sls,
    sob,
    soh,
    sod,
    seb,
    seh,
    HQ,
    NS,
    D: tl.constexpr,
    DP: tl.constexpr,
    SB: tl.constexpr,
):
    """Exact merge of NS partial states of row (b, h): o = sum_s w_s o_s, w_s = exp(lse_s - lse)."""
    pid = tl.program_id(0)
    b = pid // HQ
    h = pid % HQ
    d = tl.arange(0, DP)
    dmask = d < D
    # pass 1: global max of the partial lse values
    m = tl.full([SB], float("-inf"), tl.float32)
    for s0 in range(0, NS, SB):
        s = s0 + tl.arange(0, SB)
        ls = tl.load(PL + b * slb + h * slh + s * sls, mask=s < NS, other=float("-inf"))
        m = tl.maximum(m, ls)
    mx = tl.max(m, axis=0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    # pass 2: weights and weighted outputs
    wsum = tl.zeros([SB], tl.float32)
    acc = tl.zeros([DP], tl.float32)
    for s0 in range(0, NS, SB):
        s = s0 + tl.arange(0, SB)
        smask = s < NS
        ls = tl.load(PL + b * slb + h * slh + s * sls, mask=smask, other=float("-inf"))
        w = tl.exp(ls - mx_safe)
        po = tl.load(
            PO + b * spb + h * sph + s[:, None] * sps + d[None, :] * spd,
            mask=smask[:, None] & dmask[None, :],
            other=0.0,
        )
        wsum += w
        acc += tl.sum(w[:, None] * po, axis=0)
    total = tl.sum(wsum, axis=0)
    nonempty = total != 0.0  # a NaN partial state gives NaN, not an empty row
    o = acc / tl.where(nonempty, total, 1.0)
    lse = tl.where(nonempty, mx_safe + tl.log(tl.where(nonempty, total, 1.0)), float("-inf"))
    tl.store(O + b * sob + h * soh + d * sod, o.to(O.dtype.element_ty), mask=dmask)
    tl.store(LSE + b * seb + h * seh, lse)


@triton.jit
def _merge_kernel(
    OA,
    LA,
    OB,
    LB,
    O,
    L,
    N,
    D,
    soa,
    sda,
    sla,
    sob,
    sdb,
    slb,
    so,
    sd,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < N
    la = tl.load(LA + r * sla, mask=rmask, other=float("-inf"))
    lb = tl.load(LB + r * slb, mask=rmask, other=float("-inf"))
    mx = tl.maximum(la, lb)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    wa = tl.exp(la - mx_safe)
    wb = tl.exp(lb - mx_safe)
    total = wa + wb
    nonempty = total != 0.0  # NaN lse in -> NaN out (ops.merge_states' contract), never "empty"
    inv = 1.0 / tl.where(nonempty, total, 1.0)
    lse = tl.where(nonempty, mx_safe + tl.log(tl.where(nonempty, total, 1.0)), float("-inf"))
    # reference.merge_states: logaddexp(+inf, x) = +inf (o is NaN: w = exp(inf - inf)); NaN stays NaN
    lse = tl.where((la == float("inf")) | (lb == float("inf")),
                   tl.where((la != la) | (lb != lb), float("nan"), float("inf")), lse)
    tl.store(L + r, lse, mask=rmask)
    wa = wa * inv
    wb = wb * inv
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m2 = rmask[:, None] & (d < D)[None, :]
        a = tl.load(OA + r[:, None] * soa + d[None, :] * sda, mask=m2, other=0.0).to(tl.float32)
        b = tl.load(OB + r[:, None] * sob + d[None, :] * sdb, mask=m2, other=0.0).to(tl.float32)
        # an empty part (lse = -inf) contributes nothing, whatever its o holds
        o = tl.where((la == float("-inf"))[:, None], 0.0, wa[:, None] * a)
        o += tl.where((lb == float("-inf"))[:, None], 0.0, wb[:, None] * b)
        tl.store(O + r[:, None] * so + d[None, :] * sd, o.to(O.dtype.element_ty), mask=m2)


# ----------------------------------------------------------------------------- host side


@cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a small pretend GPU, so CPU tests exercise several splits


def num_splits(n_programs: int, tmax: int, sms: int, min_chunk: int = _MIN_CHUNK) -> int:
    """Chunks per key segment: ~_WAVES programs per SM, each chunk >= min_chunk keys."""
    if tmax <= 0:
        return 1
    want = max(1, math.ceil(_WAVES * sms / max(1, n_programs)))
    return max(1, min(want, math.ceil(tmax / min_chunk), _MAX_SPLITS))


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels store outputs in: the interpreter truncates fp32 -> bf16 casts
    (measured with triton 3.9) instead of rounding to nearest, so under TRITON_INTERPRET=1
    kernels write fp32 and torch rounds."""
    return torch.float32 if os.environ.get("TRITON_INTERPRET", "0") == "1" else dtype


def _check_dtype(x: Tensor) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the triton backend supports float16, bfloat16 and float32, got {x.dtype}")


def partial_num_warps(rows_p2: int, dp: int) -> int:
    """8 warps once R x DP >= 512: with 4, ptxas spilled registers for sm_80/sm_90 at 16 rows x Dh 64
    and at 4 rows x Dh 128 with softcap (`cacheaug kernels --compile`)."""
    return 8 if rows_p2 * dp >= 512 else 4


def _block_n(rows_p2: int, dp: int) -> int:
    # keep the [R, BLOCK_N, DP] broadcast product at ~1k elements per warp (~2k at DP 256; no tl.dot
    # here, so BLOCK_N may go below 16): the budgets that compiled spill-free for sm_80 and sm_90 with
    # the invisible-key guards (`cacheaug kernels --compile`; ptxas spilled a few bytes at 2k for
    # DP 128 and at 1k for DP 256)
    budget = (2048 if dp >= 256 else 1024) * partial_num_warps(rows_p2, dp)
    return max(4, min(128, triton.next_power_of_2(max(1, budget // (rows_p2 * dp)))))


def cascade_requests_per_program(b: int, g: int, dh: int) -> int:
    """Requests sharing one program on the cascade's shared prefix: up to 16 query rows, and at most
    1024 (rows x padded head dim) so the partial kernel's tiles stay in registers."""
    dp = triton.next_power_of_2(dh)
    return max(1, min(b, 16 // g, 1024 // (g * dp)))


def partial_constexprs(g: int, bb: int, dh: int) -> dict:
    """Constexprs of `_partial_kernel` for GQA group g, bb requests per program, head dim dh."""
    r = triton.next_power_of_2(bb * g)
    dp = triton.next_power_of_2(dh)
    return dict(G=g, BB=bb, R=r, D=dh, DP=dp, BLOCK_N=_block_n(r, dp))


def _launch_partial(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lens: Tensor,
    po: Tensor,
    pl: Tensor,
    *,
    shared: bool,
    seg_t: int,
    split_off: int,
    splits: int,
    chunk: int,
    qbase: int,
    pos_off: int,
    lens_is_seg: bool,
    scale: float,
    softcap: float | None,
    window: int | None,
    bb: int,
) -> None:
    b, hq, dh = q.shape
    hkv = k.shape[-3]
    meta = partial_constexprs(hq // hkv, bb, dh)
    skb = 0 if shared else k.stride(0)
    svb = 0 if shared else v.stride(0)
    grid = (triton.cdiv(b, bb) * hkv, splits)
    _partial_kernel[grid](
        q,
        k,
        v,
        lens,
        po,
        pl,
        *q.stride(),  # [B, Hq, Dh]
        skb,
        *k.stride()[-3:],
        svb,
        *v.stride()[-3:],
        *po.stride(),  # [B, Hq, splits, Dh]
        *pl.stride(),  # [B, Hq, splits]
        lens.stride(0),
        b,
        hkv,
        seg_t,
        chunk,
        split_off,
        qbase,
        pos_off,
        window or 0,
        scale,
        softcap or 1.0,
        LENS_IS_SEG=lens_is_seg,
        HAS_WINDOW=window is not None,
        HAS_SOFTCAP=softcap is not None,
        **meta,
        num_warps=partial_num_warps(meta["R"], meta["DP"]),
    )


def _reduce(po: Tensor, pl: Tensor, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    b, hq, ns, dh = po.shape
    o = torch.empty((b, hq, dh), dtype=_store_dtype(out_dtype), device=po.device)
    lse = torch.empty((b, hq), dtype=torch.float32, device=po.device)
    if b * hq:
        _reduce_kernel[(b * hq,)](
            po,
            pl,
            o,
            lse,
            *po.stride(),
            *pl.stride(),
            *o.stride(),
            *lse.stride(),
            hq,
            ns,
            D=dh,
            DP=triton.next_power_of_2(dh),
            SB=16,
        )
    return o.to(out_dtype), lse


def _chunking(tmax: int, n_programs: int, device: torch.device, splits: int | None) -> tuple[int, int]:
    s = splits if splits is not None else num_splits(n_programs, tmax, _device_sms(device))
    s = max(1, min(s, max(1, tmax)))
    chunk = max(1, math.ceil(tmax / s)) if tmax > 0 else 1
    return math.ceil(tmax / chunk) if tmax > 0 else 1, chunk


def decode_attention_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lens: Tensor,
    *,
    softcap: float | None = None,
    window: int | None = None,
    scale: float | None = None,
    splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Split-KV decode; `splits` overrides the heuristic (tests use it)."""
    _check_dtype(q)
    b, hq, dh = q.shape
    hkv, tmax = k.shape[1], k.shape[2]
    scale = default_scale(scale, dh)
    ns, chunk = _chunking(tmax, b * hkv, q.device, splits)
    po = torch.empty((b, hq, ns, dh), dtype=torch.float32, device=q.device)
    pl = torch.empty((b, hq, ns), dtype=torch.float32, device=q.device)
    if b * hq == 0:
        return torch.empty_like(q), torch.empty((b, hq), dtype=torch.float32, device=q.device)
    _launch_partial(
        q,
        k,
        v,
        lens,
        po,
        pl,
        shared=False,
        seg_t=tmax,
        split_off=0,
        splits=ns,
        chunk=chunk,
        qbase=0,
        pos_off=0,
        lens_is_seg=True,
        scale=scale,
        softcap=softcap,
        window=window,
        bb=1,
    )
    return _reduce(po, pl, q.dtype)


def cascade_decode_impl(
    q: Tensor,
    k_shared: Tensor,
    v_shared: Tensor,
    k_suffix: Tensor,
    v_suffix: Tensor,
    suffix_lens: Tensor,
    *,
    softcap: float | None = None,
    window: int | None = None,
    scale: float | None = None,
    splits: int | None = None,
    requests_per_program: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Shared prefix (each K/V block loaded once for a tile of requests) + suffix + merge."""
    _check_dtype(q)
    b, hq, dh = q.shape
    hkv, t = k_shared.shape[0], k_shared.shape[1]
    length = k_suffix.shape[2]
    g = hq // hkv
    scale = default_scale(scale, dh)
    bb = requests_per_program or cascade_requests_per_program(b, g, dh)
    ns_a, chunk_a = _chunking(t, triton.cdiv(max(b, 1), bb) * hkv, q.device, splits)
    ns_b, chunk_b = _chunking(length, b * hkv, q.device, splits)
    ns_a = ns_a if t > 0 else 0
    ns_b = ns_b if length > 0 else 0
    if b * hq == 0 or ns_a + ns_b == 0:
        o = torch.zeros_like(q)
        return o, torch.full((b, hq), float("-inf"), dtype=torch.float32, device=q.device)
    po = torch.empty((b, hq, ns_a + ns_b, dh), dtype=torch.float32, device=q.device)
    pl = torch.empty((b, hq, ns_a + ns_b), dtype=torch.float32, device=q.device)
    common = dict(scale=scale, softcap=softcap, window=window, qbase=t)
    if ns_a:
        _launch_partial(
            q,
            k_shared,
            v_shared,
            suffix_lens,
            po,
            pl,
            shared=True,
            seg_t=t,
            split_off=0,
            splits=ns_a,
            chunk=chunk_a,
            pos_off=0,
            lens_is_seg=False,
            bb=bb,
            **common,
        )
    if ns_b:
        _launch_partial(
            q,
            k_suffix,
            v_suffix,
            suffix_lens,
            po,
            pl,
            shared=False,
            seg_t=length,
            split_off=ns_a,
            splits=ns_b,
            chunk=chunk_b,
            pos_off=t,
            lens_is_seg=True,
            bb=1,
            **common,
        )
    return _reduce(po, pl, q.dtype)


def merge_states(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    _check_dtype(o_a)
    shape = o_a.shape
    dh = shape[-1]
    oa, ob = o_a.reshape(-1, dh), o_b.reshape(-1, dh)
    la, lb = lse_a.reshape(-1), lse_b.reshape(-1)
    n = oa.shape[0]
    o = torch.empty((n, dh), dtype=_store_dtype(o_a.dtype), device=o_a.device)
    lse = torch.empty((n,), dtype=torch.float32, device=o_a.device)
    if n and dh:
        block_r = 16
        _merge_kernel[(triton.cdiv(n, block_r),)](
            oa,
            la,
            ob,
            lb,
            o,
            lse,
            n,
            dh,
            oa.stride(0),
            oa.stride(1),
            la.stride(0),
            ob.stride(0),
            ob.stride(1),
            lb.stride(0),
            o.stride(0),
            o.stride(1),
            BLOCK_R=block_r,
            BLOCK_D=min(128, triton.next_power_of_2(dh)),
        )
    return o.to(o_a.dtype).reshape(shape), lse.reshape(shape[:-1])


decode_attention, cascade_decode = public_decode_ops(decode_attention_impl, cascade_decode_impl)

__all__ = ["decode_attention", "cascade_decode", "merge_states", "num_splits"]

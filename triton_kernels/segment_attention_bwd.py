"""Backward kernels of the fused segment attention (forward: segment_attention.py).

Three launches, none with atomics, so results are bitwise deterministic:

1. `_delta_kernel`: delta = rowsum(dO * O) - dlse (fp32 [B, Hq, N*S]). Subtracting the
   lse gradient folds d(lse)/d(s) = P into the usual dS = P * (dP - delta).
2. `_dq_kernel`: one program per packed row tile (same tiling as the forward: G query
   heads x a contiguous range of query rows), walking the same visible key ranges
   (prefix, then own-block keys) and accumulating dq in registers.
3. `_dkdv_kernel`: one program per tile of BLOCK_N *block* keys of one (batch, KV head);
   it loops over the packed query rows that can see those keys - rows of the same
   block(s), from the causal diagonal (or the block start) up to the block end (or the
   window end) - for all G query heads of the group. The GQA reduction therefore happens
   inside one program, in a fixed order. The prefix gets no dk/dv (frozen cache).

Invisible keys and rows (contract: reference.finite_keys): K/V tiles (and, in the dk/dv kernel, the
q/dO row tiles it mixes) go through `common.zero_nonfinite` before the dots; a non-finite key or row scores NaN for
the pairs that see each other, and dS is masked with the visibility, so a key a row
cannot see never reaches that row's dq, and a row never reaches the dk/dv of a key it
cannot see, whatever either's memory holds.

Dots run on the input dtype (P and dS are cast down, as in FlashAttention-2) with fp32
accumulation; dO may have any strides (autograd hands `out.sum()`'s gradient over as an
expanded stride-0 tensor).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import segment_attention_configs as cfgs
from .common import (
    common_meta,
    launch,
    local_visible,
    nonfinite_lines,
    prefix_visible,
    program_row_tile,
    row_key_ranges,
    row_tile,
    scores,
    zero_nonfinite,
)


@triton.jit
def _delta_kernel(O, DO, DLSE, DELTA, sob, soh, son, sod, sdb, sdh, sdn, sdd, slb, slh, sln,
                  HQ, NS, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
    pid_bh = tl.program_id(0).to(tl.int64)  # B*Hq on axis 0 (axis 1 stops at 65535)
    b = pid_bh // HQ
    h = pid_bh % HQ
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    n_ok = n < NS
    offs_d = tl.arange(0, BLOCK_D)
    mask = n_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * sob + h * soh + n[:, None] * son + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + n[:, None] * sdn + offs_d[None, :] * sdd, mask=mask, other=0.0)
    dlse = tl.load(DLSE + b * slb + h * slh + n * sln, mask=n_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1) - dlse.to(tl.float32)
    tl.store(DELTA + pid_bh * NS + n, delta, mask=n_ok)


@triton.jit
def _dq_step(dq, q, do, k, v, vis, lse2, delta, qk_scale, softcap,
             HAS_SOFTCAP: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # a non-finite k scores NaN, a non-finite v makes dp NaN: both only where vis (ds is masked);
    # the last dot zeroes k's non-finite entries so ds = 0 never meets them (0 x NaN)
    s, t = scores(q, tl.trans(k), qk_scale, softcap, HAS_SOFTCAP, INPUT_PRECISION)
    pr = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    ds = pr * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    ds = tl.where(vis, ds, 0.0)
    return dq + tl.dot(ds.to(k.dtype), zero_nonfinite(k), input_precision=INPUT_PRECISION)


@triton.jit
def _load_rows(Q, DO, LSE, DELTA, b, h, n, row_ok, offs_d, d_ok, sqb, sqh, sqn, sqd, sdb, sdh, sdn, sdd,
               HKV, NS, GROUP: tl.constexpr, DOT_F32: tl.constexpr):
    """A packed-row tile's q, dO, lse (base 2) and delta: what both backward kernels read per row."""
    rmask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h[:, None] * sqh + n[:, None] * sqn + offs_d[None, :] * sqd,
                mask=rmask, other=0.0)
    do = tl.load(DO + b * sdb + h[:, None] * sdh + n[:, None] * sdn + offs_d[None, :] * sdd,
                 mask=rmask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    stat = (b * (HKV * GROUP) + h) * NS + n
    lse2 = tl.load(LSE + stat, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
    return q, do, lse2, delta, rmask


@triton.jit
def _dq_kernel(
    Q, K, V, KP, VP, PL, DO, LSE, DELTA, DQ,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    spkb, spkh, spkn, spkd, spvb, spvh, spvn, spvd, sdb, sdh, sdn, sdd, sgb, sgh, sgn, sgd,
    NS, T, N, S, HKV, qk_scale, softcap, window, NS_BUCKET, T_BUCKET,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b, kvh, h, row_ok, n, blk, i, p = program_row_tile(PL, NS, N, S, HKV, GROUP, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q, do, lse2, delta, rmask = _load_rows(Q, DO, LSE, DELTA, b, h, n, row_ok, offs_d, d_ok,
                                           sqb, sqh, sqn, sqd, sdb, sdh, sdn, sdd, HKV, NS, GROUP, DOT_F32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    p_lo, p_hi, l_lo, l_hi = row_key_ranges(row_ok, n, blk, p, i, NS, S, window, CAUSAL, HAS_WINDOW, BLOCK_N)

    kp_base = KP + b * spkb + kvh * spkh
    vp_base = VP + b * spvb + kvh * spvh
    for start in range(p_lo, p_hi, BLOCK_N):
        offs_j = start + tl.arange(0, BLOCK_N)
        kmask = (offs_j < p_hi)[:, None] & d_ok[None, :]
        k = tl.load(kp_base + offs_j[:, None] * spkn + offs_d[None, :] * spkd, mask=kmask, other=0.0)
        v = tl.load(vp_base + offs_j[:, None] * spvn + offs_d[None, :] * spvd, mask=kmask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        vis = prefix_visible(offs_j, p, i, window, HAS_WINDOW)
        dq = _dq_step(dq, q, do, k, v, vis, lse2, delta, qk_scale, softcap, HAS_SOFTCAP, INPUT_PRECISION)

    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    for start in range(l_lo, l_hi, BLOCK_N):
        offs_m = start + tl.arange(0, BLOCK_N)
        kmask = (offs_m < l_hi)[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_m[:, None] * skn + offs_d[None, :] * skd, mask=kmask, other=0.0)
        v = tl.load(v_base + offs_m[:, None] * svn + offs_d[None, :] * svd, mask=kmask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        vis = local_visible(offs_m, NS, S, blk, i, window, CAUSAL, HAS_WINDOW)
        dq = _dq_step(dq, q, do, k, v, vis, lse2, delta, qk_scale, softcap, HAS_SOFTCAP, INPUT_PRECISION)

    dq = dq * qk_scale
    tl.store(DQ + b * sgb + h[:, None] * sgh + n[:, None] * sgn + offs_d[None, :] * sgd,
             dq.to(DQ.dtype.element_ty), mask=rmask)


@triton.jit
def _dkdv_kernel(
    Q, K, V, PL, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
    skgb, skgh, skgn, skgd, svgb, svgh, svgn, svgd,
    NS, T, N, S, HKV, qk_scale, softcap, window, NS_BUCKET, T_BUCKET,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.num_programs(1) - 1 - tl.program_id(1)
    pid_bh = tl.program_id(0).to(tl.int64)  # B*Hkv on axis 0 (axis 1 stops at 65535)
    b = pid_bh // HKV
    kvh = pid_bh % HKV
    m_first = pid_n * BLOCK_N
    offs_m = m_first + tl.arange(0, BLOCK_N)
    m_ok = offs_m < NS
    kb = offs_m // S
    ki = offs_m - kb * S
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kmask = m_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + kvh * skh + offs_m[:, None] * skn + offs_d[None, :] * skd,
                mask=kmask, other=0.0)
    v = tl.load(V + b * svb + kvh * svh + offs_m[:, None] * svn + offs_d[None, :] * svd,
                mask=kmask, other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query rows that can see these keys: same block(s), at or after the diagonal.
    m_last = tl.minimum(m_first + BLOCK_N, NS) - 1
    if CAUSAL:
        n_lo = m_first
    else:
        n_lo = (m_first // S) * S
    n_hi = (m_last // S + 1) * S
    if HAS_WINDOW:
        n_hi = tl.minimum(n_hi, m_last + window)
    r_stop = n_hi * GROUP
    for start in range(n_lo * GROUP, r_stop, BLOCK_M):
        row_ok, n, g, blk, i, p = row_tile(start, r_stop, PL, b, N, NS, S, GROUP, BLOCK_M)
        h = kvh * GROUP + g
        q, do, lse2, delta, _ = _load_rows(Q, DO, LSE, DELTA, b, h, n, row_ok, offs_d, d_ok,
                                               sqb, sqh, sqn, sqd, sdb, sdh, sdn, sdd, HKV, NS, GROUP, DOT_F32)
        # non-finite k or q: NaN scores; non-finite v or dO: NaN dpT; a row with a non-finite dO
        # scores NaN so that dv of the keys it sees turns NaN. All masked with vis; the dots'
        # row operands are zeroed where non-finite, so 0 (invisible) x NaN never happens.
        s, t = scores(k, tl.trans(q), qk_scale, softcap, HAS_SOFTCAP, INPUT_PRECISION)  # [BLOCK_N, BLOCK_M]
        s = tl.where(nonfinite_lines(do, 1)[None, :], float("nan"), s)
        vis = (kb[:, None] == blk[None, :]) & m_ok[:, None] & row_ok[None, :]
        if CAUSAL:
            vis = vis & (ki[:, None] <= i[None, :])
        if HAS_WINDOW:
            vis = vis & (ki[:, None] > i[None, :] - window)
        pT = tl.where(vis, tl.exp2(s - lse2[None, :]), 0.0)
        dv += tl.dot(pT.to(do.dtype), zero_nonfinite(do), input_precision=INPUT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * (1.0 - t * t)
        dsT = tl.where(vis, dsT, 0.0)
        dk += tl.dot(dsT.to(q.dtype), zero_nonfinite(q), input_precision=INPUT_PRECISION)

    dk = dk * qk_scale
    tl.store(DK + b * skgb + kvh * skgh + offs_m[:, None] * skgn + offs_d[None, :] * skgd,
             dk.to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + b * svgb + kvh * svgh + offs_m[:, None] * svgn + offs_d[None, :] * svgd,
             dv.to(DV.dtype.element_ty), mask=kmask)


_KEY = ["NS_BUCKET", "T_BUCKET", "S", "GROUP", "BLOCK_D", "CAUSAL", "HAS_SOFTCAP", "HAS_WINDOW"]
_dq_tuned = triton.autotune(
    configs=cfgs.candidates("dq"), key=_KEY,
    prune_configs_by={"early_config_prune": cfgs.make_pruner("dq", _dq_kernel)},
)(_dq_kernel)
_dkdv_tuned = triton.autotune(
    configs=cfgs.candidates("dkdv"), key=_KEY,
    prune_configs_by={"early_config_prune": cfgs.make_pruner("dkdv", _dkdv_kernel)},
)(_dkdv_kernel)


def backward(do: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, k_prefix: Tensor, v_prefix: Tensor,
             prefix_lens: Tensor, o: Tensor, lse: Tensor, block_len: int, causal: bool, softcap, window,
             scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv); dO and dlse may have any strides (stride-0 expanded grads included)."""
    b, hq, ns, dh = q.shape
    hkv = k.shape[1]
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    if q.device.type == "cuda":
        torch.cuda.set_device(q.device)
    lse = lse.contiguous()
    delta = torch.empty((b, hq, ns), device=q.device, dtype=torch.float32)
    bd = cfgs.block_d(dh)
    rows = 16 if cfgs.interpreting() else max(16, min(128, 8192 // bd))
    _delta_kernel[(b * hq, triton.cdiv(ns, rows))](
        o, do, dlse, delta, *o.stride(), *do.stride(), *dlse.stride(), hq, ns,
        HEAD_DIM=dh, BLOCK_D=bd, BLOCK=rows,
    )
    scalars, consts = common_meta(q, k_prefix, block_len, causal, softcap, window, scale)
    dq_args = (
        q, k, v, k_prefix, v_prefix, prefix_lens, do, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *k_prefix.stride(), *v_prefix.stride(),
        *do.stride(), *dq.stride(),
    )
    launch(_dq_kernel, _dq_tuned, "dq", ns * (hq // hkv), b * hkv, dq_args, scalars, consts,
           q.dtype, dh, q.device)
    dkdv_args = (
        q, k, v, prefix_lens, do, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
    )
    launch(_dkdv_kernel, _dkdv_tuned, "dkdv", ns, b * hkv, dkdv_args, scalars, consts, q.dtype, dh, q.device)
    return dq, dk, dv

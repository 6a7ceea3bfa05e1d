"""Fused Triton segment attention: forward kernel, launchers, op.

The contract is ops.segment_attention's docstring (cacheaug_engine/ops/__init__.py).

Layout: q [B, Hq, N*S, Dh]; k, v [B, Hkv, N*S, Dh] (the blocks' own keys); k_prefix,
v_prefix [B, Hkv, T, Dh] (the frozen cache); prefix_lens int [B, N]. Row i of block k
sits at absolute position p_k + i and sees prefix keys j < p_k plus its own block's keys
(i' <= i when causal), optionally only keys at positions > p_k + i - window.

Tiling ("packed rows"). One program owns BLOCK_M *packed rows* of one (batch, KV head):
packed row r = n * G + g, with n the global query row in [0, N*S) and g the query head
within the GQA group (G = Hq // Hkv). So
  * all G query heads that share a KV head are processed together: every K/V tile is
    loaded once for G heads (no K/V copy, G-fold less K/V traffic);
  * a tile covers a contiguous range of query rows n, so it may span the end of one block
    and the start of the next: small S never leaves tensor-core rows idle (S = 31, G = 4
    fills 124 of 128 rows; S = 1 packs 128 / G blocks per tile).
Per tile the program walks two key ranges, each only where some row of the tile sees a key:
  * prefix keys [lo, max_rows(p)) with lo = 0, or the window start min_rows(p + i - window + 1);
  * block keys from the first row's block start (or its window start) up to the last
    row's causal diagonal (or the end of its block when causal=False).
Masks are applied per element inside those ranges; the concatenated [T + N*S] keys and
dense masks never exist. Cost is ~ sum_k G*S*(p_k + S) per KV head, plus at most one
partial tile per range (and, when a tile spans two blocks, the gap p_{k+1} - p_k).

Invisible keys (contract: reference.finite_keys): a tile mixes rows that see a key with rows that do
not (block boundaries, the causal diagonal, the window, different p_k), and masking the
probability alone is not enough (0 x NaN = NaN inside tl.dot). Every K/V tile therefore
goes through `common.zero_nonfinite`: non-finite entries are zeroed for the dots and the key is
flagged; a flagged key scores NaN before masking, so exactly the rows that see it turn
NaN (the torch reference does the same, reference.finite_keys). The backward kernels do
the same for the query rows they mix (q, dO), and mask dS with the visibility.

Numerics: online softmax in base 2 with fp32 accumulators; lse is returned as natural
log in fp32 [B, Hq, N*S]. Softcap c*tanh(s/c) is applied before masking. fp32 inputs use
IEEE fp32 dots unless torch.backends.cuda.matmul.allow_tf32 is set. Under
TRITON_INTERPRET=1, bf16 tiles are cast to fp32 before tl.dot (bf16 tl.dot is wrong in the
interpreter, seen with triton 3.9).

The backward kernels live in segment_attention_bwd.py, the jit and launch helpers both use in
common.py, tile configs in segment_attention_configs.py. The public entry point is `segment_attention` below, a thin
wrapper over the torch.library custom ops `cacheaug::segment_attention_fwd` / `_bwd`.
"""

import math

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - backends.py reports this before dispatch
    raise ImportError("cacheaug_engine.triton_kernels.segment_attention needs triton") from exc

from . import segment_attention_configs as cfgs
from .common import (
    common_meta,
    launch,
    local_visible,
    nonfinite_lines,
    prefix_visible,
    program_row_tile,
    row_key_ranges,
    scores,
    strides,
    zero_nonfinite,
)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


@triton.jit
def _online_step(acc, m_i, l_i, q, kT, v, vis, qk_scale, softcap,
                 HAS_SOFTCAP: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # kT only feeds the score dot, masked per element below; v feeds dot(p, v): zeroed, and a
    # key with a non-finite value scores NaN for the rows that see it.
    v_bad = nonfinite_lines(v, 1)
    v = zero_nonfinite(v)
    s, _ = scores(q, kT, qk_scale, softcap, HAS_SOFTCAP, INPUT_PRECISION)
    s = tl.where(v_bad[None, :], float("nan"), s)
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    pr = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(pr, axis=1)
    acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v, input_precision=INPUT_PRECISION)
    return acc, m_new, l_i


# ----------------------------------------------------------------------------- forward kernel


@triton.jit
def _fwd_kernel(
    Q, K, V, KP, VP, PL, O, LSE,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    spkb, spkh, spkn, spkd, spvb, spvh, spvn, spvd, sob, soh, son, sod,
    NS, T, N, S, HKV, qk_scale, softcap, window, NS_BUCKET, T_BUCKET,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b, kvh, h, row_ok, n, blk, i, p = program_row_tile(PL, NS, N, S, HKV, GROUP, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * sqb + h[:, None] * sqh + n[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    p_lo, p_hi, l_lo, l_hi = row_key_ranges(row_ok, n, blk, p, i, NS, S, window, CAUSAL, HAS_WINDOW, BLOCK_N)

    kp_base = KP + b * spkb + kvh * spkh
    vp_base = VP + b * spvb + kvh * spvh
    for start in range(p_lo, p_hi, BLOCK_N):
        offs_j = start + tl.arange(0, BLOCK_N)
        j_ok = offs_j < p_hi
        kT = tl.load(kp_base + offs_j[None, :] * spkn + offs_d[:, None] * spkd,
                     mask=j_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(vp_base + offs_j[:, None] * spvn + offs_d[None, :] * spvd,
                    mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_F32:
            kT = kT.to(tl.float32)
            v = v.to(tl.float32)
        vis = prefix_visible(offs_j, p, i, window, HAS_WINDOW)
        acc, m_i, l_i = _online_step(acc, m_i, l_i, q, kT, v, vis, qk_scale, softcap,
                                     HAS_SOFTCAP, INPUT_PRECISION)

    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    for start in range(l_lo, l_hi, BLOCK_N):
        offs_m = start + tl.arange(0, BLOCK_N)
        m_ok = offs_m < l_hi
        kT = tl.load(k_base + offs_m[None, :] * skn + offs_d[:, None] * skd,
                     mask=m_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + offs_m[:, None] * svn + offs_d[None, :] * svd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_F32:
            kT = kT.to(tl.float32)
            v = v.to(tl.float32)
        vis = local_visible(offs_m, NS, S, blk, i, window, CAUSAL, HAS_WINDOW)
        acc, m_i, l_i = _online_step(acc, m_i, l_i, q, kT, v, vis, qk_scale, softcap,
                                     HAS_SOFTCAP, INPUT_PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a row that saw a non-finite key keeps its NaN
    o = acc / l_safe[:, None]
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    tl.store(O + b * sob + h[:, None] * soh + n[:, None] * son + offs_d[None, :] * sod,
             o.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + (b * (HKV * GROUP) + h) * NS + n, lse, mask=row_ok)


_AUTOTUNE_KEY = ["NS_BUCKET", "T_BUCKET", "S", "GROUP", "BLOCK_D", "CAUSAL", "HAS_SOFTCAP", "HAS_WINDOW"]
_fwd_tuned = triton.autotune(
    configs=cfgs.candidates("fwd"), key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": cfgs.make_pruner("fwd", _fwd_kernel)},
)(_fwd_kernel)


def forward(q: Tensor, k: Tensor, v: Tensor, k_prefix: Tensor, v_prefix: Tensor, prefix_lens: Tensor,
            block_len: int, causal: bool, softcap, window, scale: float) -> tuple[Tensor, Tensor]:
    """Launch the forward kernel: returns (o like q, lse fp32 [B, Hq, N*S])."""
    b, hq, ns, dh = q.shape
    hkv = k.shape[1]
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((b, hq, ns), device=q.device, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse
    scalars, consts = common_meta(q, k_prefix, block_len, causal, softcap, window, scale)
    args = (
        q, k, v, k_prefix, v_prefix, prefix_lens, o, lse,
        *strides(q), *strides(k), *strides(v), *strides(k_prefix), *strides(v_prefix), *strides(o),
    )
    launch(_fwd_kernel, _fwd_tuned, "fwd", ns * (hq // hkv), b * hkv, args, scalars, consts,
           q.dtype, dh, q.device)
    return o, lse


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("cacheaug::segment_attention_fwd", mutates_args=())
def segment_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, k_prefix: Tensor, v_prefix: Tensor, prefix_lens: Tensor,
    block_len: int, causal: bool, softcap: float | None, window: int | None, scale: float,
) -> tuple[Tensor, Tensor]:
    """Fused forward: (o, lse). prefix_lens must be int32 and contiguous."""
    return forward(q, k, v, k_prefix, v_prefix, prefix_lens, block_len, causal, softcap, window, scale)


@segment_attention_fwd.register_fake
def _(q, k, v, k_prefix, v_prefix, prefix_lens, block_len, causal, softcap, window, scale):
    b, hq, ns, _ = q.shape
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    return o, q.new_empty((b, hq, ns), dtype=torch.float32)


@torch.library.custom_op("cacheaug::segment_attention_bwd", mutates_args=())
def segment_attention_bwd(
    do: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, k_prefix: Tensor, v_prefix: Tensor,
    prefix_lens: Tensor, o: Tensor, lse: Tensor, block_len: int, causal: bool, softcap: float | None,
    window: int | None, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused backward: (dq, dk, dv) for the blocks; the prefix gets no gradient."""
    from .segment_attention_bwd import backward

    return backward(do, dlse, q, k, v, k_prefix, v_prefix, prefix_lens, o, lse,
                    block_len, causal, softcap, window, scale)


@segment_attention_bwd.register_fake
def _(do, dlse, q, k, v, k_prefix, v_prefix, prefix_lens, o, lse, block_len, causal, softcap, window, scale):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


_PREFIX_GRAD_MSG = (
    "{names}: the fused segment attention computes no gradient for the prefix (the frozen "
    "cache); detach k_prefix/v_prefix, or use backend='torch' to differentiate through them"
)


def _setup_context(ctx, inputs, output):
    q, k, v, k_prefix, v_prefix, prefix_lens, block_len, causal, softcap, window, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, k_prefix, v_prefix, prefix_lens, o, lse)
    ctx.meta = (block_len, causal, softcap, window, scale)


def _backward(ctx, do, dlse):
    flags = (("k_prefix", ctx.needs_input_grad[3]), ("v_prefix", ctx.needs_input_grad[4]))
    needs = [name for name, flag in flags if flag]
    if needs:
        raise RuntimeError(_PREFIX_GRAD_MSG.format(names=" and ".join(needs)))
    q, k, v, k_prefix, v_prefix, prefix_lens, o, lse = ctx.saved_tensors
    dq, dk, dv = segment_attention_bwd(do, dlse, q, k, v, k_prefix, v_prefix, prefix_lens, o, lse, *ctx.meta)
    return dq, dk, dv, None, None, None, None, None, None, None, None


segment_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public entry


def check_supported(q: Tensor, k_prefix: Tensor, v_prefix: Tensor) -> None:
    """What the Triton kernels support beyond ops.validate; raises before any launch."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q: the triton backend supports float32, float16 and bfloat16, got {q.dtype} "
                         "(use backend='torch' for float64)")
    dh = q.shape[-1]
    if not 1 <= dh <= MAX_HEAD_DIM:
        raise ValueError(f"q: head dim (dim 3) must be in [1, {MAX_HEAD_DIM}] for the triton backend, "
                         f"got {dh}")
    if q.device.type == "cpu" and not cfgs.interpreting():
        raise ValueError("q: the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"q: the triton backend runs on CUDA tensors, got device {q.device}")
    if torch.is_grad_enabled():
        needs = [name for name, x in (("k_prefix", k_prefix), ("v_prefix", v_prefix)) if x.requires_grad]
        if needs:
            raise ValueError(_PREFIX_GRAD_MSG.format(names=" and ".join(needs)))


def segment_attention(
    q: Tensor, k: Tensor, v: Tensor, k_prefix: Tensor, v_prefix: Tensor, prefix_lens: Tensor,
    *, block_len: int, causal: bool = True, softcap: float | None = None, window: int | None = None,
    scale: float | None = None, return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Segment attention on the fused Triton kernels (semantics: ops.segment_attention).

    Differentiable in q, k, v (and through lse); k_prefix/v_prefix must not require grad.
    Results are deterministic: no atomics anywhere, the GQA reduction for dk/dv runs in
    one program per key tile that loops over the group's query heads.
    """
    check_supported(q, k_prefix, v_prefix)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    lens = prefix_lens.to(device=q.device, dtype=torch.int32).contiguous()
    o, lse = segment_attention_fwd(
        q, k, v, k_prefix, v_prefix, lens, int(block_len), bool(causal),
        None if softcap is None else float(softcap), None if window is None else int(window), scale,
    )
    return (o, lse) if return_lse else o


__all__ = [
    "segment_attention", "segment_attention_fwd", "segment_attention_bwd", "forward", "check_supported",
]

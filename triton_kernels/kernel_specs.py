"""Registry of the package's Triton kernels for ahead-of-time compilation (`cacheaug kernels`).

Each `KernelSpec` names one @triton.jit kernel and says, without a GPU:
  * which specialisations exist (dtype, head dim, causal, softcap, window, GQA group, ...),
  * which launch configs it may run with (the fixed default, and the autotuner's candidates),
  * the argument values of a representative launch of a specialisation, built as the
    launchers build them (same constexprs, strides of contiguous tensors, meta tensors for
    pointers, so Triton specialises alignment exactly as for a real contiguous launch).

Representative sizes are multiples of 16 (the common GPU case: Triton then marks them
16-divisible); other divisibility patterns compile to sibling variants of the same kernel.
Nothing here imports a kernel module or triton at import time; nothing queries CUDA.

Sweeps: "ci" covers every value of every axis (each dtype x head dim with the heaviest
flags, plus the plain variants); "full" is the whole product of the axes.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import segment_attention_configs as cfgs

DTYPES = ("bfloat16", "float16", "float32")
HEAD_DIMS = (64, 80, 96, 128, 256)
GROUPS = (1, 3, 4, 8)  # GQA group sizes: MHA, SmolLM2 (9/3), Llama-3 (32/8), Qwen2-style
SWEEPS = ("ci", "full")
# CI covers each dtype and each head dim (and every BLOCK_D: 64, 128, 256) at least once
_CI_PAIRS = (("bfloat16", 64), ("bfloat16", 80), ("float16", 128), ("float32", 96), ("bfloat16", 256))
_PKG = __name__.rsplit(".", 1)[0]


@dataclass(frozen=True)
class LaunchConfig:
    """Tile meta-parameters plus num_warps / num_stages of one launch; `default` = used with autotuning off."""

    meta: dict
    num_warps: int = 4
    num_stages: int = 3
    default: bool = False

    def label(self) -> str:
        tiles = "x".join(str(v) for v in self.meta.values())
        return f"{tiles + ' ' if tiles else ''}w{self.num_warps} s{self.num_stages}"


@dataclass(frozen=True)
class KernelSpec:
    """One jit kernel: where it lives, its specialisations, configs and representative arguments."""

    name: str
    module: str
    attr: str
    specialisations: Callable[[str], list[dict]]
    configs: Callable[[dict], list[LaunchConfig]]
    args: Callable[[dict, dict], tuple[list, dict]]  # (spec, tile meta) -> (positional args, named args)
    doc: str = ""
    tags: tuple = field(default=())

    def fn(self):
        """The @triton.jit function (imports its module)."""
        return getattr(importlib.import_module(self.module), self.attr)


def _t(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _dtype(spec: dict) -> torch.dtype:
    return getattr(torch, spec["dtype"])


# ----------------------------------------------------------------------------- segment attention


def _seg_specs(sweep: str) -> list[dict]:
    def spec(dtype, hd, causal, softcap, window, group):
        return dict(dtype=dtype, head_dim=hd, causal=causal, softcap=softcap, window=window, group=group)

    if sweep == "full":
        return [spec(*x) for x in itertools.product(DTYPES, HEAD_DIMS, (True, False), (False, True),
                                                     (False, True), GROUPS)]
    # every default config (one per BLOCK_D x 16/32-bit) with the heaviest flags, every dtype and head dim,
    # and the plain (non-causal, no softcap/window) variants
    heavy = [spec(d, hd, True, True, True, 3) for d, hd in _CI_PAIRS + (("float32", 64), ("float32", 256))]
    plain = [spec("bfloat16", 128, False, False, False, 1), spec("float32", 64, False, False, False, 8)]
    return heavy + plain


def _seg_configs(kernel: str) -> Callable[[dict], list[LaunchConfig]]:
    def configs(spec: dict) -> list[LaunchConfig]:
        bm, bn, w, s = cfgs.gpu_fixed_config(kernel, spec["head_dim"], _dtype(spec))
        out = [LaunchConfig({"BLOCK_M": bm, "BLOCK_N": bn}, w, s, default=True)]
        for c in cfgs.candidate_tuples(kernel):
            if c != (bm, bn, w, s):
                out.append(LaunchConfig({"BLOCK_M": c[0], "BLOCK_N": c[1]}, c[2], c[3]))
        return out

    return configs


def _seg_tensors(spec: dict):
    from .common import common_meta

    dt, dh, g = _dtype(spec), spec["head_dim"], spec["group"]
    b, hkv, n, s, t = 2, 2, 4, 64, 512
    q = _t((b, hkv * g, n * s, dh), dt)
    k, v = _t((b, hkv, n * s, dh), dt), _t((b, hkv, n * s, dh), dt)
    kp, vp = _t((b, hkv, t, dh), dt), _t((b, hkv, t, dh), dt)
    pl = _t((b, n), torch.int32)
    lse = _t((b, hkv * g, n * s), torch.float32)
    scalars, consts = common_meta(q, kp, s, spec["causal"], 50.0 if spec["softcap"] else None,
                                  256 if spec["window"] else None, dh ** -0.5)
    return dict(q=q, k=k, v=v, kp=kp, vp=vp, pl=pl, lse=lse), {**scalars, **consts}


def _st(*xs) -> list[int]:
    return [s for x in xs for s in x.stride()]


def _fwd_args(spec: dict, meta: dict):
    x, common = _seg_tensors(spec)
    o = torch.empty_like(x["q"])
    ptrs = [x["q"], x["k"], x["v"], x["kp"], x["vp"], x["pl"], o, x["lse"]]
    return [*ptrs, *_st(x["q"], x["k"], x["v"], x["kp"], x["vp"], o)], {**common, **meta}


def _dq_args(spec: dict, meta: dict):
    x, common = _seg_tensors(spec)
    do, dq = torch.empty_like(x["q"]), torch.empty_like(x["q"])
    ptrs = [x["q"], x["k"], x["v"], x["kp"], x["vp"], x["pl"], do, x["lse"], torch.empty_like(x["lse"]), dq]
    return [*ptrs, *_st(x["q"], x["k"], x["v"], x["kp"], x["vp"], do, dq)], {**common, **meta}


def _dkdv_args(spec: dict, meta: dict):
    x, common = _seg_tensors(spec)
    do, dk, dv = torch.empty_like(x["q"]), torch.empty_like(x["k"]), torch.empty_like(x["v"])
    ptrs = [x["q"], x["k"], x["v"], x["pl"], do, x["lse"], torch.empty_like(x["lse"]), dk, dv]
    return [*ptrs, *_st(x["q"], x["k"], x["v"], do, dk, dv)], {**common, **meta}


def _delta_specs(sweep: str) -> list[dict]:
    return _dtype_head_dim(sweep)


def _delta_args(spec: dict, meta: dict):
    dt, dh = _dtype(spec), spec["head_dim"]
    o, do = _t((2, 8, 256, dh), dt), _t((2, 8, 256, dh), dt)
    dlse, delta = _t((2, 8, 256), torch.float32), _t((2, 8, 256), torch.float32)
    bd = cfgs.block_d(dh)
    return ([o, do, dlse, delta, *_st(o, do, dlse), 8, 256],
            dict(HEAD_DIM=dh, BLOCK_D=bd, BLOCK=max(16, min(128, 8192 // bd)), **meta))


def _dtype_head_dim(sweep: str) -> list[dict]:
    pairs = itertools.product(DTYPES, HEAD_DIMS) if sweep == "full" else _CI_PAIRS
    return [dict(dtype=d, head_dim=hd) for d, hd in pairs]


def _single(spec: dict) -> list[LaunchConfig]:
    return [LaunchConfig({}, 4, 3, default=True)]  # Triton's launch defaults: no tile meta to tune


# ----------------------------------------------------------------------------- decode family


def _partial_specs(sweep: str) -> list[dict]:
    def spec(dtype, hd, g, softcap, window, mode):
        return dict(dtype=dtype, head_dim=hd, group=g, softcap=softcap, window=window, mode=mode)

    if sweep == "full":
        return [spec(*x) for x in itertools.product(DTYPES, HEAD_DIMS, GROUPS, (False, True), (False, True),
                                                     ("decode", "cascade_shared", "cascade_suffix"))]
    out = [spec(d, hd, 3, True, True, "decode") for d, hd in _CI_PAIRS]
    out += [spec(d, hd, g, False, False, "cascade_shared") for d, hd, g in (("bfloat16", 64, 3), ("float32", 256, 1))]
    out += [spec("bfloat16", 128, 1, False, False, "decode"), spec("float16", 128, 4, True, True, "cascade_suffix"),
            spec("bfloat16", 256, 8, True, True, "decode")]
    return out


def _partial_args(spec: dict, meta: dict):
    from .decode import partial_constexprs

    dt, dh, g = _dtype(spec), spec["head_dim"], spec["group"]
    b, hkv, tmax, ns = 16, 2, 1024, 4
    shared = spec["mode"] == "cascade_shared"
    bb = _partial_bb(spec)
    q = _t((b, hkv * g, dh), dt)
    k = _t((hkv, tmax, dh), dt) if shared else _t((b, hkv, tmax, dh), dt)
    lens = _t((b,), torch.int32)
    po, pl = _t((b, hkv * g, ns, dh), torch.float32), _t((b, hkv * g, ns), torch.float32)
    kst = [0, *k.stride()[-3:]] if shared else list(k.stride())
    args = [q, k, k, lens, po, pl, *q.stride(), *kst, *kst, *po.stride(), *pl.stride(), *lens.stride(),
            b, hkv, tmax, 256, 0, 0 if spec["mode"] == "decode" else tmax,
            tmax if spec["mode"] == "cascade_suffix" else 0,
            4096, dh ** -0.5, 50.0]
    consts = dict(LENS_IS_SEG=not shared, HAS_WINDOW=spec["window"], HAS_SOFTCAP=spec["softcap"],
                  **partial_constexprs(g, bb, dh))
    return args, {**consts, **meta}


def _partial_configs(spec: dict) -> list[LaunchConfig]:
    from .decode import partial_constexprs, partial_num_warps

    c = partial_constexprs(spec["group"], _partial_bb(spec), spec["head_dim"])
    return [LaunchConfig({}, partial_num_warps(c["R"], c["DP"]), 3, default=True)]


def _partial_bb(spec: dict) -> int:
    from .decode import cascade_requests_per_program

    if spec["mode"] != "cascade_shared":
        return 1
    # cascade_decode's default tile of requests for a large batch (the most rows per program)
    return cascade_requests_per_program(1 << 20, spec["group"], spec["head_dim"])


def _reduce_specs(sweep: str) -> list[dict]:
    return _dtype_head_dim(sweep)


def _reduce_args(spec: dict, meta: dict):
    dt, dh = _dtype(spec), spec["head_dim"]
    po, pl = _t((4, 8, 4, dh), torch.float32), _t((4, 8, 4), torch.float32)
    o, lse = _t((4, 8, dh), dt), _t((4, 8), torch.float32)
    return ([po, pl, o, lse, *_st(po, pl, o, lse), 8, 4],
            dict(D=dh, DP=1 << (dh - 1).bit_length(), SB=16, **meta))


def _merge_specs(sweep: str) -> list[dict]:
    return _dtype_head_dim(sweep)


def _merge_args(spec: dict, meta: dict):
    dt, dh = _dtype(spec), spec["head_dim"]
    oa, la = _t((64, dh), dt), _t((64,), torch.float32)
    o = _t((64, dh), dt)
    return ([oa, la, oa, la, o, la, 64, dh, *oa.stride(), *la.stride(), *oa.stride(), *la.stride(), *o.stride()],
            dict(BLOCK_R=16, BLOCK_D=min(128, 1 << (dh - 1).bit_length()), **meta))


SEG = f"{_PKG}.segment_attention"
SEG_BWD = f"{_PKG}.segment_attention_bwd"
DECODE = f"{_PKG}.decode"

KERNELS: tuple[KernelSpec, ...] = (
    KernelSpec("segment_attention.fwd", SEG, "_fwd_kernel", _seg_specs, _seg_configs("fwd"), _fwd_args,
               "forward: o and lse of packed GQA row tiles", ("segment",)),
    KernelSpec("segment_attention.bwd_delta", SEG_BWD, "_delta_kernel", _delta_specs, _single, _delta_args,
               "backward: delta = rowsum(dO * O) - dlse"),
    KernelSpec("segment_attention.bwd_dq", SEG_BWD, "_dq_kernel", _seg_specs, _seg_configs("dq"), _dq_args,
               "backward: dq per packed row tile", ("segment",)),
    KernelSpec("segment_attention.bwd_dkdv", SEG_BWD, "_dkdv_kernel", _seg_specs, _seg_configs("dkdv"),
               _dkdv_args, "backward: dk, dv per block-key tile", ("segment",)),
    KernelSpec("decode.partial", DECODE, "_partial_kernel", _partial_specs, _partial_configs, _partial_args,
               "split-KV partial attention (decode, cascade shared prefix and suffix)"),
    KernelSpec("decode.reduce", DECODE, "_reduce_kernel", _reduce_specs, _single, _reduce_args,
               "log-sum-exp reduction of the split partials"),
    KernelSpec("decode.merge_states", DECODE, "_merge_kernel", _merge_specs, _single, _merge_args,
               "exact merge of two attention states"),
)


def by_name(name: str, kernels: tuple[KernelSpec, ...] = KERNELS) -> KernelSpec:
    for k in kernels:
        if k.name == name:
            return k
    raise KeyError(f"no kernel named {name!r}; known: {', '.join(k.name for k in kernels)}")


def launch_values(kernel: KernelSpec, spec: dict, config: LaunchConfig) -> dict:
    """{parameter name: value} of a representative launch (positional args + constexprs + tile meta)."""
    fn = kernel.fn()
    positional, named = kernel.args(spec, config.meta)
    values = dict(zip(fn.arg_names, positional, strict=False))  # checked just below
    values.update(named)
    missing = [a for a in fn.arg_names if a not in values]
    extra = sorted(set(values) - set(fn.arg_names))
    if missing or extra or len(positional) > len(fn.arg_names):
        raise ValueError(f"{kernel.name}: arguments do not match the kernel: missing {missing}, unknown {extra}, "
                         f"{len(positional)} positional for {len(fn.arg_names)} parameters")
    return values

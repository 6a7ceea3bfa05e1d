"""Tile configurations for the segment-attention kernels (forward, dq, dk/dv).

Three regimes:

* TRITON_INTERPRET=1 (CPU CI): always one small fixed config (16 x 16 tiles), so that
  tiny test shapes still cross tile, block and prefix boundaries, and no time is spent
  autotuning in the interpreter.
* CACHEAUG_AUTOTUNE=0: one fixed config per (kernel, head dim, dtype) that is sane on
  A100 and H100 (see `fixed_config`).
* otherwise (GPU default): `triton.autotune` over the candidates below, pruned per call
  by head dim, dtype, the device's shared memory and the problem size.

Meta-parameters: BLOCK_M = packed query rows per tile (query position x GQA head, see
segment_attention.py), BLOCK_N = keys per tile. Nothing here queries CUDA at import.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # triton is optional for the package; this module is only imported with it present
    import triton
except ImportError:  # pragma: no cover - segment_attention.py reports the missing package
    triton = None

KERNELS = ("fwd", "dq", "dkdv")

# (BLOCK_M, BLOCK_N, num_warps, num_stages). Candidates chosen from the usual FA2 Triton
# space on sm_80 / sm_90: 128-row tiles win for 16-bit Dh <= 128 once enough rows exist
# (GQA packing makes that common), 64-row tiles for Dh 256 or fp32.
_CANDIDATES = {
    "fwd": [
        (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4),
        (64, 64, 4, 3), (64, 128, 4, 3), (64, 64, 8, 4), (64, 32, 4, 4),
        (64, 32, 4, 2), (32, 32, 4, 2), (32, 32, 4, 1),
    ],
    "dq": [
        (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 64, 8, 2),
        (64, 32, 4, 3), (32, 64, 4, 2), (32, 32, 4, 2), (32, 32, 4, 1),
    ],
    # dkdv: BLOCK_N keys are the program's own; BLOCK_M is the query-row step.
    "dkdv": [
        (64, 128, 8, 3), (64, 64, 4, 3), (64, 64, 8, 2), (32, 128, 8, 3),
        (32, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2), (32, 32, 4, 1),
    ],
}

_INTERPRET_CONFIG = (16, 16, 4, 1)
_DEFAULT_SMEM = 166912  # A100 opt-in shared memory per block (bytes); H100 has 232448


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    """Autotune on the GPU unless CACHEAUG_AUTOTUNE=0; never in the interpreter."""
    return not interpreting() and os.environ.get("CACHEAUG_AUTOTUNE", "1") != "0"


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two >= 16 (tl.dot needs K >= 16); 80/96 -> 128."""
    return max(16, 1 << (head_dim - 1).bit_length())


def fixed_config(kernel: str, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) used when autotuning is off."""
    if interpreting():
        return _INTERPRET_CONFIG
    return gpu_fixed_config(kernel, head_dim, dtype)


# Fixed configs (autotuning off), by (kernel, BLOCK_D, fp32?).
# Each compiles for sm_80 and sm_90 without register spills for every specialisation (the CI step
# `cacheaug kernels --compile` checks that; softcap + window + causal is the heaviest). fp32 runs
# IEEE FMA dots whose operands live in registers, hence the small tiles; dk/dv keep two
# BLOCK_N x Dh fp32 accumulators (the previous 64-row dk/dv and fp32 tiles spilled on both targets).
# Chosen by compiling candidates; ptxas sometimes spills a few bytes at low register counts, so a
# neighbouring shape is picked where that happens.
# Re-chosen after the invisible-key guards (reference.finite_keys) raised register pressure: the
# previous 16-bit fwd/dq/dkdv d128, fwd/dq d256 and fp32 dkdv tiles spilled 16-1028 B on one target.
_FIXED = {
    ("fwd", 64, False): (128, 32, 8, 3), ("fwd", 128, False): (64, 32, 8, 2), ("fwd", 256, False): (64, 32, 8, 1),
    ("dq", 64, False): (64, 64, 8, 2), ("dq", 128, False): (64, 32, 8, 2), ("dq", 256, False): (32, 32, 8, 2),
    ("dkdv", 64, False): (32, 64, 8, 2), ("dkdv", 128, False): (32, 64, 8, 1), ("dkdv", 256, False): (32, 32, 8, 2),
    ("fwd", 64, True): (32, 32, 8, 1), ("fwd", 128, True): (32, 32, 8, 1), ("fwd", 256, True): (16, 16, 4, 1),
    ("dq", 64, True): (16, 16, 4, 1), ("dq", 128, True): (16, 16, 8, 1), ("dq", 256, True): (32, 32, 8, 1),
    ("dkdv", 64, True): (32, 32, 8, 1), ("dkdv", 128, True): (16, 32, 8, 1), ("dkdv", 256, True): (32, 16, 8, 1),
}


def gpu_fixed_config(kernel: str, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """The GPU's fixed config (whatever TRITON_INTERPRET says): compiled for sm_80/sm_90 in CI."""
    return _FIXED[(kernel, min(256, max(64, block_d(head_dim))), dtype == torch.float32)]


def _smem_limit(device: torch.device | None) -> int:
    if device is None or device.type != "cuda":
        return _DEFAULT_SMEM
    try:
        props = torch.cuda.get_device_properties(device)
    except Exception:  # noqa: BLE001 - fall back to the A100 budget
        return _DEFAULT_SMEM
    return int(getattr(props, "shared_memory_per_block_optin", _DEFAULT_SMEM) or _DEFAULT_SMEM)


def smem_bytes(kernel: str, bm: int, bn: int, stages: int, bd: int, elsize: int) -> int:
    """Rough shared-memory estimate: resident row tiles + pipelined key/value tiles."""
    if kernel == "fwd":
        return elsize * (bm * bd + stages * 2 * bn * bd)
    if kernel == "dq":  # q, do resident; k, v pipelined
        return elsize * (2 * bm * bd + stages * 2 * bn * bd)
    return elsize * (2 * bn * bd + stages * 2 * bm * bd)  # dkdv: k, v resident; q, do pipelined


def prune(kernel: str, configs, bd: int, dtype: torch.dtype, rows: int, device: torch.device | None):
    """Keep the candidates that fit the device and make sense for this problem."""
    elsize = 4 if dtype == torch.float32 else 2
    limit = _smem_limit(device) - 2048
    out = []
    for cfg in configs:
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        stages = cfg.num_stages
        if bd >= 256 and (bm * bn > 64 * 64 or stages > 2):
            continue
        if elsize == 4 and bm * bn > 64 * 64:
            continue
        if kernel != "dkdv" and bm > max(32, triton.next_power_of_2(max(rows, 1))):
            continue  # more packed rows per tile than the problem has
        if smem_bytes(kernel, bm, bn, stages, bd, elsize) > limit:
            continue
        out.append(cfg)
    if not out:  # the smallest candidate always runs
        out = [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))]
    return out


def candidate_tuples(kernel: str) -> list[tuple[int, int, int, int]]:
    """The autotuner's candidates of `kernel` as (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    return list(_CANDIDATES[kernel])


def candidates(kernel: str):
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in _CANDIDATES[kernel]
    ]


# ----------------------------------------------------------------------------- compile rule
# A candidate that fails to compile, spills registers, or needs more shared memory than the
# device allows is never handed to the autotuner. The rule reads compile records (see
# triton_kernels/compile_check.py), so the same rule holds for `cacheaug kernels --compile`
# (ahead of time, sm_80 / sm_90, in CI) and for the live device, where each candidate is
# compiled once for its compute capability (cached per specialisation) before autotuning.

_PROBE_KEYS = ("BLOCK_D", "HEAD_DIM", "GROUP", "CAUSAL", "HAS_SOFTCAP", "HAS_WINDOW", "DOT_F32", "INPUT_PRECISION")


def rejection(record: dict) -> str | None:
    """Why a compiled launch must never run: its compile error, spills, or shared memory over the limit."""
    if record.get("status") != "ok":
        return record.get("error") or "compile failed"
    if record.get("spills"):
        return f"spills {record['spills']} B of registers to local memory"
    if record.get("shared_bytes", 0) > record.get("smem_limit", float("inf")):
        return f"shared memory {record['shared_bytes']} B over the limit {record['smem_limit']} B"
    return None


def compile_probe_enabled() -> bool:
    """Compile-check candidates on the device before autotuning (CACHEAUG_COMPILE_PROBE=0 turns it off)."""
    return os.environ.get("CACHEAUG_COMPILE_PROBE", "1") != "0"


@functools.cache
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


_PROBED: dict[tuple, str | None] = {}


def probe_rejection(kernel: str, fn, cfg, args: dict, arch: int, compile_fn=None) -> str | None:
    """`rejection` of candidate `cfg` of jit kernel `fn`, compiled on this launch's arguments for sm_<arch>, cached."""
    key = (kernel, arch, tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages, str(args["Q"].dtype),
           *(args[k] for k in _PROBE_KEYS))
    if key not in _PROBED:
        if compile_fn is None:
            from .compile_check import compile_launch as compile_fn
        rec = compile_fn(fn, {**args, **cfg.kwargs}, arch=arch, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        _PROBED[key] = rejection(rec)
    return _PROBED[key]


def prune_by_compile(kernel: str, fn, configs, args: dict, arch: int, compile_fn=None) -> list:
    """The candidates whose compile for sm_<arch> passes `rejection` (at least the smallest is kept)."""
    kept = [c for c in configs if probe_rejection(kernel, fn, c, args, arch, compile_fn) is None]
    if not kept:
        reasons = {f"{c.kwargs} w{c.num_warps} s{c.num_stages}": probe_rejection(kernel, fn, c, args, arch, compile_fn)
                   for c in configs}
        raise RuntimeError(f"{kernel}: no tile config compiles for sm_{arch} without spills: {reasons}")
    return kept


def make_pruner(kernel: str, fn=None):
    """early_config_prune hook: reads BLOCK_D, the dtype and sizes from the kernel's args, then
    drops candidates of jit kernel `fn` that fail the compile rule on this device (no GPU query
    before the first call; without `fn` only the size rules apply)."""

    def _prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        q = args["Q"]
        rows = int(args["NS"]) * int(args["GROUP"])
        kept = prune(kernel, configs, int(args["BLOCK_D"]), q.dtype, rows, q.device)
        if fn is not None and q.device.type == "cuda" and not interpreting() and compile_probe_enabled():
            index = q.device.index if q.device.index is not None else torch.cuda.current_device()
            kept = prune_by_compile(kernel, fn, kept, args, _capability(index))
        return kept

    return _prune

"""What each backend can run: op, device type, dtype, head dim and features.

A call is described by a :class:`Call`; :func:`capability_reason` says why a backend
cannot run it (None when it can). ``backends.resolve_backend`` uses this to skip
backends that cannot run a call in automatic selection, and to explain why a backend
that was named cannot. Whether the backend is installed/usable on this machine at all
(Triton present, CUDA extension built, a GPU) is ``backends.backend_reason``'s question;
this table only describes the kernels. The numbers mirror the backends' own checks
(triton_kernels/segment_attention.py ``check_supported``, ops/cuda/launch.py ``HEAD_DIMS``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FEATURES = ("softcap", "window", "return_lse", "backward")
_HALF_AND_FP32 = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Call:
    """One op call as dispatch sees it. ``features``: the subset of FEATURES it uses
    ("backward" = some input requires grad and grad mode is on)."""

    op: str
    device_type: str
    dtype: torch.dtype
    head_dim: int
    features: tuple[str, ...] = ()


@dataclass(frozen=True)
class Capability:
    """What one backend's kernels support for one op.

    head_dims: None = any, else the allowed sizes; max_head_dim bounds "any".
    backward_devices: device types where the op is differentiable.
    """

    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    head_dims: tuple[int, ...] | None = None
    max_head_dim: int | None = None
    features: tuple[str, ...] = ("softcap", "window", "return_lse")
    backward_devices: tuple[str, ...] = ()


_ANY_DEVICE = ("cpu", "cuda", "mps", "xpu", "meta")
_TORCH = Capability(_ANY_DEVICE, _HALF_AND_FP32 + (torch.float64,), backward_devices=_ANY_DEVICE)

# backend -> op -> Capability. An op missing under a backend: that backend has no such op.
CAPABILITIES: dict[str, dict[str, Capability]] = {
    "torch": {op: _TORCH for op in ("segment_attention", "decode_attention", "cascade_decode", "merge_states")},
    "flex": {
        # FlexAttention has no CPU backward (torch raises NotImplementedError there).
        "segment_attention": Capability(("cpu", "cuda"), _HALF_AND_FP32, backward_devices=("cuda",)),
    },
    "triton": {
        # On CPU tensors only under TRITON_INTERPRET=1 (backends.backend_reason says so).
        "segment_attention": Capability(
            ("cuda", "cpu"), _HALF_AND_FP32, max_head_dim=256, backward_devices=("cuda", "cpu")
        ),
        "decode_attention": Capability(("cuda", "cpu"), _HALF_AND_FP32),
        "cascade_decode": Capability(("cuda", "cpu"), _HALF_AND_FP32),
        "merge_states": Capability(("cuda", "cpu"), _HALF_AND_FP32),
    },
    "cuda": {
        "decode_attention": Capability(("cuda",), _HALF_AND_FP32, head_dims=(64, 128, 256)),
        "cascade_decode": Capability(("cuda",), _HALF_AND_FP32, head_dims=(64, 128, 256)),
        "merge_states": Capability(("cuda",), _HALF_AND_FP32),
    },
}


def _dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def capability_reason(backend: str, call: Call) -> str | None:
    """Why ``backend``'s kernels cannot run ``call`` (None = they can)."""
    ops = CAPABILITIES.get(backend, {})
    cap = ops.get(call.op)
    if cap is None:
        have = ", ".join(b for b in CAPABILITIES if call.op in CAPABILITIES[b])
        return f"{call.op} has no {backend} backend (it has: {have})"
    if call.device_type not in cap.devices:
        return f"{backend} runs {call.op} on {'/'.join(cap.devices)} tensors, got {call.device_type}"
    if call.dtype not in cap.dtypes:
        return f"{backend} runs {call.op} in {', '.join(map(_dtype_name, cap.dtypes))}, got {_dtype_name(call.dtype)}"
    if cap.head_dims is not None and call.head_dim not in cap.head_dims:
        return f"{backend} runs {call.op} with head dims {cap.head_dims}, got {call.head_dim}"
    if cap.max_head_dim is not None and not 1 <= call.head_dim <= cap.max_head_dim:
        return f"{backend} runs {call.op} with head dims 1..{cap.max_head_dim}, got {call.head_dim}"
    for feat in sorted(call.features):
        if feat == "backward":
            if call.device_type not in cap.backward_devices:
                where = f"backward on {'/'.join(cap.backward_devices)} only" if cap.backward_devices else "no backward"
                return f"{backend} {call.op} is forward-only on {call.device_type} ({where})"
        elif feat not in cap.features:
            return f"{backend} {call.op} does not support {feat}"
    return None


def _devices(devices: tuple[str, ...]) -> str:
    return "any" if devices == _ANY_DEVICE else "/".join(devices)


def matrix() -> list[dict[str, object]]:
    """One row per (backend, op): devices, dtypes, head dims, features, backward devices."""
    rows: list[dict[str, object]] = []
    for backend, ops in CAPABILITIES.items():
        for op, cap in ops.items():
            dims = (
                ",".join(map(str, cap.head_dims)) if cap.head_dims
                else f"1..{cap.max_head_dim}" if cap.max_head_dim else "any"
            )
            rows.append({
                "backend": backend, "op": op, "devices": _devices(cap.devices),
                "dtypes": ",".join(map(_dtype_name, cap.dtypes)), "head_dims": dims,
                "features": ",".join(cap.features), "backward": _devices(cap.backward_devices) or "no",
            })
    return rows


def format_matrix() -> str:
    """The capability matrix as an aligned text table (``cacheaug info``)."""
    rows = matrix()
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols).rstrip()]
    lines += ["  ".join(str(r[c]).ljust(width[c]) for c in cols).rstrip() for r in rows]
    return "\n".join(lines)

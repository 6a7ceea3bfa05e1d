"""Backend availability and selection.

Selection order: explicit ``backend=`` argument > ``CACHEAUG_BACKEND`` environment
variable > the best available backend for the tensors' device. A backend that is named
but cannot run raises :class:`BackendUnavailableError` saying why; nothing falls back
silently. Nothing here touches CUDA at import time.

``CACHEAUG_BACKEND`` is either one name for every op (``triton``) or per-op entries
(``segment_attention=flex,decode_attention=cuda``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from functools import cache

import torch

from cacheaug_engine.ops.capabilities import Call, capability_reason

BACKEND_NAMES = ("torch", "flex", "triton", "cuda")

# Which backends implement which op, in order of preference on a CUDA device.
OP_BACKENDS: dict[str, tuple[str, ...]] = {
    "segment_attention": ("triton", "flex", "torch"),
    "decode_attention": ("cuda", "triton", "torch"),
    "cascade_decode": ("cuda", "triton", "torch"),
    "merge_states": ("cuda", "triton", "torch"),
}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for (argument or CACHEAUG_BACKEND) but cannot run here."""


def _failed(module: str, exc: BaseException) -> str:
    return f"{module} failed to import: {type(exc).__name__}: {exc}"


@cache
def _flex_import_reason() -> str | None:
    """None when FlexAttention imports, else a one-line reason."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason to report
        return _failed("torch.nn.attention.flex_attention", exc)
    return None


@cache
def _extension_import_reason() -> str | None:
    """None when the CUDA extension imports, else a one-line reason."""
    try:
        from cacheaug_engine import _C  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a missing build or a broken one are both reasons
        return _failed("cacheaug_engine._C", exc)
    return None


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_reason(name: str, device: torch.device | None = None) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (None means it can).

    With ``device=None`` the question is whether the backend can run anywhere on this
    machine (used by :func:`backends`).
    """
    if name not in BACKEND_NAMES:
        return f"unknown backend {name!r}; expected one of {', '.join(BACKEND_NAMES)}"
    dev_type = None if device is None else torch.device(device).type
    if name == "torch":
        return None
    if name == "flex":
        return _flex_import_reason()
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed (pip install triton)"
        if dev_type == "cpu" or (dev_type is None and not torch.cuda.is_available()):
            if not _triton_interpret():
                return "Triton needs a CUDA GPU, or TRITON_INTERPRET=1 to run its kernels on the CPU"
            return None
        if dev_type is not None and dev_type != "cuda":
            return f"Triton kernels run on CUDA tensors (or CPU under TRITON_INTERPRET=1), got {dev_type}"
        return None
    # cuda
    reason = _extension_import_reason()
    if reason is not None:
        return (
            "the CUDA extension cacheaug_engine._C is not built (install with nvcc present, "
            f"or CACHEAUG_BUILD_CUDA=1): {reason}"
        )
    if dev_type not in (None, "cuda"):
        return f"the cuda backend runs on CUDA tensors, got {dev_type} tensors"
    if not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    return None


def backends() -> dict[str, dict[str, object]]:
    """Each backend's availability on this machine, its reason if not, and its ops."""
    report: dict[str, dict[str, object]] = {}
    for name in BACKEND_NAMES:
        reason = backend_reason(name)
        report[name] = {
            "available": reason is None,
            "reason": reason or "ok",
            "ops": [op for op, names in OP_BACKENDS.items() if name in names],
        }
    return report


def _env_choice(op: str) -> str | None:
    """The backend CACHEAUG_BACKEND names for ``op`` (None if it names none).

    The whole variable is checked on every read: a misspelt op name or backend name, or an
    entry that is not ``op=backend``, raises instead of being silently ignored.
    """
    raw = os.environ.get("CACHEAUG_BACKEND", "").strip()
    if not raw:
        return None
    if "=" not in raw:
        if raw not in BACKEND_NAMES:
            raise ValueError(f"CACHEAUG_BACKEND={raw!r}: unknown backend; expected one of {', '.join(BACKEND_NAMES)}")
        return raw
    choice = None
    for entry in raw.split(","):
        if not entry.strip():
            continue
        key, sep, value = (x.strip() for x in entry.partition("="))
        if not sep or key not in OP_BACKENDS:
            raise ValueError(
                f"CACHEAUG_BACKEND={raw!r}: entry {entry.strip()!r} must be op=backend with op one of "
                f"{', '.join(OP_BACKENDS)}"
            )
        if value not in BACKEND_NAMES:
            raise ValueError(
                f"CACHEAUG_BACKEND={raw!r}: unknown backend {value!r} for {key}; expected one of "
                f"{', '.join(BACKEND_NAMES)}"
            )
        if key == op:
            choice = value
    return choice


# Automatic choices so far, per (op, device type, dtype, head dim, features): resolved once,
# then every layer's call is a dict lookup.
_AUTO: dict[tuple, str] = {}


def resolve_backend(
    op: str, requested: str | None, device: torch.device, *, dtype: torch.dtype | None = None,
    head_dim: int | None = None, features: tuple[str, ...] = (),
) -> str:
    """The backend that will run ``op`` on ``device``; raises if a named one cannot.

    With ``dtype`` and ``head_dim`` given, a backend must also support them and every
    feature in ``features`` (capabilities.FEATURES): automatic selection skips backends
    that cannot run the call (the choice is cached per op, device type, dtype, head dim
    and features); a named backend that cannot run it raises BackendUnavailableError
    with the reason.
    """
    supported = OP_BACKENDS[op]
    source = "backend="
    name = requested
    if name is None:
        name = _env_choice(op)
        source = "CACHEAUG_BACKEND="
    call = None if dtype is None or head_dim is None else Call(op, device.type, dtype, int(head_dim), tuple(features))
    if name is not None:
        if name not in BACKEND_NAMES:
            raise ValueError(f"{source}{name!r} for {op}: expected one of {', '.join(BACKEND_NAMES)}")
        if name not in supported:
            raise BackendUnavailableError(
                f"{source}{name!r}: {op} has no {name} backend (it has: {', '.join(supported)})"
            )
        reason = backend_reason(name, device)
        if reason is None and call is not None:
            reason = capability_reason(name, call)
        if reason is not None:
            raise BackendUnavailableError(f"{source}{name!r} for {op} is unavailable: {reason}")
        return name
    key = (op, device.type, dtype, head_dim, tuple(features))
    choice = _AUTO.get(key)
    if choice is None:
        choice = _AUTO[key] = _auto_choice(op, device, call)
    return choice


def _auto_choice(op: str, device: torch.device, call: Call | None) -> str:
    """The first backend in OP_BACKENDS order that is available and can run ``call``. Off CUDA
    it is the torch backend (the Triton interpreter and CPU flex are for tests, not speed)."""
    if device.type != "cuda":
        return "torch"
    for candidate in OP_BACKENDS[op]:
        if backend_reason(candidate, device) is None and (call is None or capability_reason(candidate, call) is None):
            return candidate
    return "torch"

"""The device a command runs on and its autocast dtype: "auto" -> cuda when present, else cpu."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from cacheaug_engine.checks import check_device


def pick_device(name: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; a named cuda without a device raises."""
    check_device(name)  # a misspelt name or a missing GPU: ValueError naming --device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no CUDA device is available")
    return dev


PRECISIONS = ("auto", "fp32", "bf16", "bf16-weights")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of a precision setting: "auto" is bf16 on CUDA and None (plain fp32) on the
    CPU; "fp32" is None; "bf16" and "bf16-weights" are bf16 on any device."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return None if precision == "fp32" else torch.bfloat16


def slow_bf16_note(device: torch.device, dtype: torch.dtype | None) -> str | None:
    """Why bf16 compute will be slower than fp32 here (a CPU without bf16 instructions, whose bf16
    GEMMs oneDNN emulates), or None. bench/results/train_precision_cpu.json has the measurement."""
    if dtype != torch.bfloat16 or device.type != "cpu" or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return (f"this CPU has no bf16 instructions (torch CPU capability {torch.backends.cpu.get_cpu_capability()}): "
            "bf16 GEMMs are emulated and slower than fp32")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast(device.type, dtype)``, or a no-op context when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

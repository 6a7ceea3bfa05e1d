"""Checks of weight tensors as a loader reads them: floating point, and finite unless skipped.

A safetensors file whose header is intact but whose payload bytes are corrupted reads without
error and yields NaN/Inf weights; integer tensors (quantized exports, a wrong conversion) would be
cast to float silently. Both are refused here, naming the file and the tensor, before a model is
built from them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

FLOAT_WEIGHTS = "float32, float16 or bfloat16"


def check_weight(source: str | Path, name: str, tensor: Tensor, *, check_finite: bool = True) -> None:
    """ValueError naming ``source`` and ``name`` when ``tensor`` is not floating point or (with
    ``check_finite``) holds a NaN/Inf value."""
    if not tensor.is_floating_point():
        raise ValueError(
            f"{source}: tensor {name!r} has dtype {str(tensor.dtype).replace('torch.', '')}; expected "
            f"floating-point weights ({FLOAT_WEIGHTS}) - integer or quantized tensors are not supported"
        )
    if check_finite and tensor.numel() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"{source}: tensor {name!r} holds {bad} NaN/Inf value(s) of {tensor.numel()}; expected finite "
            "weights (the file is corrupted; load with check_finite=False to skip this check)"
        )

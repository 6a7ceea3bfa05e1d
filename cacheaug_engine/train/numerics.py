"""The trainer's finite-loss guard: a step whose loss or gradient norm is not finite stops the run.

Checked after the backward pass and before ``optimizer.step()``, so a NaN/Inf never reaches
the weights, the optimizer state or a checkpoint; the last checkpoint written stays the
newest one on disk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss or gradient norm (the run stops; no checkpoint of that step)."""


def grad_norm(params: Sequence[torch.Tensor], clip: float) -> float:
    """Total L2 norm of the gradients; clipped to ``clip`` in place when ``clip > 0``."""
    if clip > 0:
        return _scalar(torch.nn.utils.clip_grad_norm_(params, clip))
    grads = [p.grad for p in params if p.grad is not None]
    return _scalar(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _scalar(total: torch.Tensor) -> float:
    # under FSDP2 the gradients are DTensor shards and the norm a DTensor: the full value is global
    full = getattr(total, "full_tensor", None)
    return float(full() if full is not None else total)


def check_step_finite(step: int, loss: float, gnorm: float, last_saved: tuple[int, Path] | None) -> None:
    """Raise NonFiniteLossError naming ``step`` when ``loss`` or ``gnorm`` is NaN/Inf."""
    if math.isfinite(loss) and math.isfinite(gnorm):
        return
    kept = (
        f"the last good checkpoint (step {last_saved[0]}) at {last_saved[1]} is kept"
        if last_saved is not None
        else "no checkpoint was written"
    )
    raise NonFiniteLossError(
        f"step {step}: non-finite loss ({loss}) or gradient norm ({gnorm}); training stopped before the "
        f"optimizer step, {kept} (lower --lr, or check the data and model)"
    )

"""Linear layers over frozen weights; on the CPU, oneDNN with each weight packed once.

On the CPU, eager ``F.linear`` calls MKL sgemm. A frozen decoder's weights never change, so
we pack each one into oneDNN's blocked layout once (``mkldnn._reorder_linear_weight``) and
run ``mkldnn._linear_pointwise`` against the packed copy. The arithmetic is the same fp32
GEMM; only the summation order differs (its RMS error against float64 measured 1.5-2x MKL's
on these shapes, both at fp32 rounding level; tests/ops/test_frozen_linear.py). The backward pass
(dx = dy W; a frozen weight gets no gradient) runs against a second packed copy, of W^T, made
the first time a backward needs it.

Why: on the 2-core AMD EPYC (AVX-512) CI machine, with the SmolLM2-135M configuration, this
took our decoder from parity with transformers (0.98-1.01x its time on F.linear) to 0.80x for
prefill at T 256, 0.90x at T 1024, 0.80x for the decoder side of a training step and 0.73x for
greedy generation at batch 4 (docs/cpu-vs-transformers.json, made by bench/cpu_peer.py).
Cost: one packed copy of every frozen weight; a second one once a backward runs through it.

Layers: launcher ``_run`` -> ``_OneDNNLinear`` (autograd) -> public ``frozen_linear``.
Backends: "torch" (``F.linear``), "onednn" (CPU, float32, frozen weight and bias, eager),
"auto" (oneDNN when it can run the call, else torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

BACKENDS = ("auto", "torch", "onednn")


def check_backend(backend: str) -> str:
    """``backend`` if it names a linear backend, else ValueError naming the choices."""
    if backend not in BACKENDS:
        raise ValueError(f"linear backend: expected one of {BACKENDS}, got {backend!r}")
    return backend


def onednn_reason(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> str | None:
    """Why the oneDNN packed path cannot run ``x @ weight.T + bias``; None when it can."""
    if torch.compiler.is_compiling():
        return "under torch.compile (inductor plans its own GEMMs)"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return f"it runs on CPU tensors only, got x on {x.device} and weight on {weight.device}"
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return f"it runs float32 only, got x {x.dtype} and weight {weight.dtype}"
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return "the weight and bias must be frozen (requires_grad=False): a packed weight gets no gradient"
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"):
        return f"the bias must be a float32 CPU tensor, got {bias.dtype} on {bias.device}"
    return None


def availability() -> str:
    """One line for ``cacheaug info``: what "auto" runs the frozen projections on here."""
    why = onednn_reason(torch.zeros(1, 1), torch.zeros(1, 1))
    if why is None:
        return "auto = onednn (packed weights) for frozen float32 CPU weights, torch F.linear otherwise"
    return f"auto = torch F.linear (onednn unavailable: {why})"


@dataclass
class _Packed:
    """oneDNN copies of one weight: ``fwd`` packs W [N, K], ``bwd`` (lazy) packs W^T [K, N]."""

    key: tuple[Any, ...]
    fwd: Tensor
    bwd: Tensor | None = field(default=None)


# Keyed by the weight tensor itself (id-based, weakly held): a LoRA clone or a tied lm_head that
# shares the tensor shares its packs, and a replaced tensor's packs die with it.
_PACKS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _pack(w: Tensor) -> Tensor:
    # Packs are plain tensors even when the first call comes under inference_mode (a pack made
    # there could not be used by later calls outside it).
    with torch.inference_mode(False), torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous().clone(), None)


def _packed(weight: Tensor) -> _Packed:
    """The packs of ``weight``, remade when its storage or contents (version counter) changed."""
    key = (weight.data_ptr(), weight._version, tuple(weight.shape))
    p = _PACKS.get(weight)
    if p is None or p.key != key:
        p = _PACKS[weight] = _Packed(key, _pack(weight))
    return p


def _run(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """One oneDNN GEMM: x [..., K] against a packed [N, K] weight -> [..., N]."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b on packed weights; backward gives dx only (W and b are frozen)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, packed: _Packed) -> Tensor:
        ctx.packed = packed
        ctx.save_for_backward(weight)  # autograd then refuses a weight changed in place since
        return _run(x, packed.fwd, bias)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (weight,) = ctx.saved_tensors
        packed: _Packed = ctx.packed
        if packed.bwd is None:
            packed.bwd = _pack(weight.t())
        return _run(dy, packed.bwd, None), None, None, None


def frozen_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, backend: str = "auto") -> Tensor:
    """``x @ weight.T + bias`` for a frozen weight, differentiable in ``x``.

    Args:
        x: [..., K] activations (any dtype/device ``F.linear`` takes).
        weight: [N, K]; bias: [N] or None.
        backend: "auto" (oneDNN when ``onednn_reason`` is None, else torch), "torch"
            (``F.linear``) or "onednn" (raises RuntimeError with the reason when it cannot run).

    Returns [..., N] in x's dtype. On oneDNN the weight and bias get no gradient (they must
    have requires_grad False); the result matches ``F.linear`` up to fp32 summation order.
    """
    if backend == "torch":
        return F.linear(x, weight, bias)
    check_backend(backend)
    reason = onednn_reason(x, weight, bias)
    if reason is None:
        return _OneDNNLinear.apply(x, weight, bias, _packed(weight))
    if backend == "onednn":
        raise RuntimeError(f"linear backend 'onednn' cannot run this call: {reason}")
    return F.linear(x, weight, bias)


class FrozenLinear(torch.nn.Linear):
    """``nn.Linear`` whose forward is :func:`frozen_linear` (``self.backend``, default "auto").

    Same parameters and state-dict keys as ``nn.Linear``; a trainable weight (requires_grad)
    simply takes the torch path under "auto".
    """

    backend: str = "auto"

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in_features] -> [..., out_features]."""
        return frozen_linear(x, self.weight, self.bias, backend=self.backend)

"""LoRA adapters over shared frozen weights.

``shared_clone(module)`` makes a structural copy of a module whose parameters and buffers
are the *same tensors* as the original's (nothing is copied); ``add_lora`` then swaps the
chosen ``nn.Linear`` children of that clone for :class:`LoRALinear` wrappers. The original
module is untouched, so the frozen decoder and a LoRA coprocessor share one set of weights.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * x A^T B^T, with ``base`` frozen and shared.

    A starts Kaiming-uniform, B at zero, so a fresh adapter computes exactly ``base``.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank = rank
        self.scaling = (alpha if alpha is not None else rank) / rank
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32, device=w.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32, device=w.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @property
    def weight(self) -> Tensor:
        """The base weight (for code that inspects ``.weight``)."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        """The base bias."""
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        """base(x) plus the low-rank update (computed in x's dtype)."""
        a, b = self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)
        return self.base(x) + (x @ a.t() @ b.t()) * self.scaling

    def merged_weight(self) -> Tensor:
        """W + scaling * B A (fp32), e.g. to export a merged copy."""
        return self.base.weight.float() + self.scaling * (self.lora_b @ self.lora_a)


def shared_clone(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure that shares every parameter and buffer tensor."""
    memo: dict[int, object] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        memo[id(t)] = t
    return copy.deepcopy(module, memo)


def add_lora(
    module: nn.Module, rank: int, alpha: float | None = None, targets: tuple[str, ...] = DEFAULT_TARGETS
) -> list[LoRALinear]:
    """Replace every ``nn.Linear`` child named in ``targets`` by a LoRALinear (in place).

    Returns the adapters in module order. Raises ValueError when nothing matched.
    """
    found: list[tuple[nn.Module, str, nn.Linear]] = []
    for parent in module.modules():
        for name, child in parent.named_children():
            if name in targets and isinstance(child, nn.Linear):
                found.append((parent, name, child))
    if not found:
        raise ValueError(f"no nn.Linear named {targets} found for LoRA")
    adapters = []
    for parent, name, child in found:
        ad = LoRALinear(child, rank, alpha)
        setattr(parent, name, ad)
        adapters.append(ad)
    return adapters

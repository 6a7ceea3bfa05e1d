"""Controls that tell cache augmentation from a soft prompt (the paper's Pause Token ablation).

A gain from latents counts as cache augmentation only if it beats latents that cannot read
the cache, on the same targets:

* **pause** (the paper's Pause Token baseline): a trainable table of N_L latents, the same at
  every point, trained by the same trainer - ``Coprocessor(..., latents="pause")``
  (``cacheaug train --latents pause``);
* **shuffled**: the coprocessor's latents computed from *another* sequence's cache at the same
  points (:func:`shuffled_latents` rolls the batch by one row);
* **mean**: the coprocessor's mean latent over a sample of training points, used everywhere
  (``eval.evaluator.mean_latent`` + :class:`ConstantLatents`).

:class:`LatentStats` gives the cache-dependence figure: the RMS of each point's deviation from
the mean latent over the latent RMS (0 = a constant, i.e. a soft prompt).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .layout import BlockLayout


class ConstantLatents(nn.Module):
    """The same latents ``table`` [N_L, d] at every point (the "mean" control; no cache read).

    Has the ``num_latents`` / ``placement`` / ``forward(cache, layout)`` interface of a
    coprocessor, so it drops into ``CacheAugmentationObjective`` and the evaluation.
    """

    def __init__(self, table: Tensor, placement: str, shift_tokens: bool = True) -> None:
        super().__init__()
        if table.dim() != 2:
            raise ValueError(f"table must be [N_L, d], got shape {tuple(table.shape)}")
        self.register_buffer("table", table.detach().float().clone())
        self.placement = placement
        self.shift_tokens = shift_tokens

    @property
    def num_latents(self) -> int:
        """N_L."""
        return self.table.shape[0]

    def forward(self, cache: Any, layout: BlockLayout) -> Tensor:
        """Latents [B, N, N_L, d]: the table at every point of ``layout``."""
        b, n = layout.prefix_lens.shape
        return self.table.view(1, 1, *self.table.shape).expand(b, n, -1, -1)


def shuffled_latents(latents: Tensor, shift: int = 1) -> Tensor:
    """Row b gets row (b - shift) mod B's latents [B, N, N_L, d]: computed from another sequence's
    cache at the same point index. Needs B >= 2 (with one row there is no other cache)."""
    b = latents.shape[0]
    if b < 2:
        raise ValueError(f"the shuffled control needs a batch of >= 2 sequences, got {b}")
    if shift % b == 0:
        raise ValueError(f"shift {shift} maps every row of a batch of {b} onto itself")
    return latents.roll(shift, dims=0)


class LatentStats:
    """Streaming cache-dependence figure over latents [B, N, N_L, d].

    ``ratio()`` = RMS over points (and dims) of z - mean(z) per slot, over the RMS of z:
    0 when every point gets the same latents.
    """

    def __init__(self) -> None:
        self.sum: Tensor | None = None  # [N_L, d] float64
        self.sum_sq = 0.0
        self.count = 0

    def update(self, latents: Tensor) -> None:
        """Add the points of ``latents`` [B, N, N_L, d]."""
        z = latents.detach().double().flatten(0, 1)  # [P, N_L, d]
        s = z.sum(0).cpu()
        self.sum = s if self.sum is None else self.sum + s
        self.sum_sq += float(z.pow(2).sum())
        self.count += z.shape[0]

    def ratio(self) -> float:
        """Deviation RMS / latent RMS (NaN before any update)."""
        if self.sum is None or self.count == 0:
            return float("nan")
        numel = self.sum.numel()
        ms = self.sum_sq / (self.count * numel)
        mean = self.sum / self.count
        dev_ms = max(ms - float(mean.pow(2).sum()) / numel, 0.0)
        return (dev_ms / ms) ** 0.5 if ms > 0 else float("nan")

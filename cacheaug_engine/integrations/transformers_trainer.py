"""The cache-augmentation objective under ``transformers.Trainer`` and ``accelerate``.

    model = ObjectiveModel(CacheAugmentationObjective(decoder, coprocessor, ahead=16))
    ObjectiveTrainer(model=model, args=TrainingArguments(...), train_dataset=ds).train()
    # or any accelerate loop: out = model(**batch); accelerator.backward(out["loss"])

A dataset yields {"input_ids": long [T]} (optionally "positions": long [N], fixed points); the
default collator stacks them. Example: examples/hf_trainer.py. transformers (5.x) and accelerate
are optional extras: importing this module requires them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer

from ..augment.objective import CacheAugmentationObjective


class ObjectiveModel(nn.Module):
    """``CacheAugmentationObjective`` as a model for ``transformers.Trainer`` / ``accelerate``.

    ``forward(input_ids, positions=None, num_items_in_batch=None) -> {"loss", "ce_aug", "ce_base"}``
    (other collator keys, e.g. attention_mask or labels, are ignored). Only the coprocessor's
    parameters train; the decoder is frozen.

    Gradient accumulation: ``loss`` is this micro-batch's mean cross-entropy over its targets.
    * plain ``transformers.Trainer`` (batches without "labels": no item count) or ``accelerate``
      (``accelerator.backward`` divides by the accumulation steps): each micro-batch's mean is divided
      by the number of micro-batches, which is exactly the mean over the whole accumulated batch
      when the micro-batches score the same number of targets (equal batch sizes: keep
      ``dataloader_drop_last=True``);
    * :class:`ObjectiveTrainer` counts the targets of all micro-batches of a step and passes that
      count as ``num_items_in_batch``; the loss is then this micro-batch's *sum* over that count,
      exact for any batch sizes (Trainer does not divide again: ``accepts_loss_kwargs``).
    """

    accepts_loss_kwargs = True

    def __init__(self, objective: CacheAugmentationObjective) -> None:
        super().__init__()
        self.objective = objective

    def count_items(self, batch: dict[str, Any]) -> int:
        """Targets one micro-batch scores: B x N x N_A (N from its "positions" when given)."""
        pos = batch.get("positions")
        n = pos.numel() if isinstance(pos, Tensor) else int(batch["input_ids"].shape[0]) * self.objective.num_positions
        return int(n) * self.objective.ahead

    def forward(
        self, input_ids: Tensor, positions: Tensor | None = None, num_items_in_batch: Any = None, **_: Any
    ) -> dict[str, Tensor]:
        """The objective on ``input_ids`` [B, T] at ``positions`` [B, N] (random when None)."""
        out = self.objective(input_ids, positions)
        loss = out.loss
        if num_items_in_batch is not None:
            n = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=loss.device)
            loss = loss * (out.ce_aug.numel() / n)
        return {"loss": loss, "ce_aug": out.ce_aug, "ce_base": out.ce_base}


class ObjectiveTrainer(Trainer):
    """``transformers.Trainer`` for an :class:`ObjectiveModel`: counts the scored targets of each
    accumulated step (``get_batch_samples``) so the loss is normalised exactly (see ObjectiveModel)."""

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The step's micro-batches and the number of targets they score (summed over processes)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, ObjectiveModel):
            raise TypeError(f"ObjectiveTrainer: expected an ObjectiveModel, got {type(model).__name__}")
        count = torch.tensor(sum(model.count_items(b) for b in batches), device=device)
        if self.accelerator.num_processes > 1:
            count = self.accelerator.gather(count).sum()
        return batches, count

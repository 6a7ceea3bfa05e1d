"""The objective under transformers.Trainer and accelerate (examples/hf_trainer.py), 3 steps each,
and gradient accumulation normalised exactly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_trainer.py"


def _example():
    spec = importlib.util.spec_from_file_location("hf_trainer_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Fixed(torch.utils.data.Dataset):
    """Rows with fixed augmentation points, so two runs score the same targets."""

    def __init__(self, n: int, t: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(4)
        self.ids = torch.randint(3, vocab, (n, t), generator=g)
        self.pos = torch.stack([torch.randperm(t - 8, generator=g)[:2].sort().values + 2 for _ in range(n)])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "positions": self.pos[i]}


def _trainable(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("loop", ["trainer", "accelerate"])
def test_three_steps(loop: str) -> None:
    ex = _example()
    dec = ex.tiny_decoder()
    frozen = [p.detach().clone() for p in dec.parameters()]
    model = ex.objective_model(dec)
    before = _trainable(model)
    data = ex.TokenDataset(torch.randint(3, 128, (16 * 24,), generator=torch.Generator().manual_seed(0)), 24)
    run = ex.train_with_trainer if loop == "trainer" else ex.train_with_accelerate
    losses = run(model, data, steps=3)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = _trainable(model)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)), "nothing trained"
    assert all(torch.equal(a, b) for a, b in zip(frozen, dec.parameters(), strict=True)), "the decoder moved"


def _one_sgd_step(trainer_cls, batch: int, accumulate: int) -> list[torch.Tensor]:
    from transformers import TrainingArguments

    ex = _example()
    model = ex.objective_model(ex.tiny_decoder())
    before = _trainable(model)
    args = TrainingArguments(
        output_dir="unused", max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate,
        learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, save_strategy="no",
        report_to=[], use_cpu=True, dataloader_drop_last=True, disable_tqdm=True, seed=0,
    )
    trainer_cls(model=model, args=args, train_dataset=Fixed(2, 24, 128)).train()
    return [a - b for a, b in zip(_trainable(model), before, strict=True)]


@pytest.mark.parametrize("which", ["ObjectiveTrainer", "Trainer"])
def test_gradient_accumulation_is_the_full_batch_mean(which: str) -> None:
    """2 micro-batches of 1 accumulated == 1 batch of 2 (SGD, lr 1: the update is the gradient)."""
    import transformers

    from cacheaug_engine.integrations.transformers_trainer import ObjectiveTrainer

    cls = ObjectiveTrainer if which == "ObjectiveTrainer" else transformers.Trainer
    full = _one_sgd_step(cls, batch=2, accumulate=1)
    acc = _one_sgd_step(cls, batch=1, accumulate=2)
    scale = max(g.abs().max().item() for g in full)
    assert scale > 0
    for g_full, g_acc in zip(full, acc, strict=True):
        assert torch.allclose(g_full, g_acc, atol=1e-6 * scale, rtol=1e-4)

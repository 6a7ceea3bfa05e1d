"""Train a coprocessor with transformers.Trainer, then with a plain accelerate loop.

    python examples/hf_trainer.py                      # a tiny random Llama, random token data
    python examples/hf_trainer.py --model DIR --steps 20 --seq-len 128
                                                       # any local transformers causal LM directory
                                                       # (text: Python's own documentation)

The decoder is any transformers causal LM wrapped as a TransformersDecoder (frozen, weights
shared); the coprocessor is LoRA on those shared weights plus soft tokens. Nothing is fetched.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch.utils.data import Dataset

from cacheaug_engine.augment import CacheAugmentationObjective, Coprocessor
from cacheaug_engine.integrations.transformers_trainer import ObjectiveModel, ObjectiveTrainer
from cacheaug_engine.models import TransformersDecoder, load_decoder, load_tokenizer


class TokenDataset(Dataset):
    """Fixed-length rows {"input_ids": long [T]} cut from one long token stream."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        n = tokens.numel() // seq_len
        if n < 1:
            raise ValueError(f"seq_len {seq_len}: only {tokens.numel()} tokens")
        self.rows = tokens[: n * seq_len].view(n, seq_len)

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i]}


def tiny_decoder(seed: int = 0) -> TransformersDecoder:
    """A 2-layer random Llama (hidden 64) wrapped as a TransformersDecoder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2)
    return TransformersDecoder(LlamaForCausalLM(cfg))


def objective_model(decoder, num_latents: int = 4, rank: int = 4, ahead: int = 4, positions: int = 2) -> ObjectiveModel:
    """LoRA coprocessor + objective, wrapped for Trainer / accelerate."""
    copro = Coprocessor(decoder, num_latents, lora_rank=rank)
    return ObjectiveModel(CacheAugmentationObjective(decoder, copro, ahead=ahead, num_positions=positions))


def train_with_trainer(model: ObjectiveModel, data: Dataset, steps: int, batch: int = 2, accumulate: int = 2,
                       lr: float = 1e-3, out_dir: str | None = None) -> list[float]:
    """``steps`` optimizer steps of ObjectiveTrainer on the CPU; returns the logged losses."""
    from transformers import TrainingArguments

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=out_dir or tmp, max_steps=steps, per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulate, learning_rate=lr, logging_steps=1, save_strategy="no",
            report_to=[], use_cpu=True, dataloader_drop_last=True, disable_tqdm=True, seed=0,
        )
        trainer = ObjectiveTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def train_with_accelerate(model: ObjectiveModel, data: Dataset, steps: int, batch: int = 2, accumulate: int = 2,
                          lr: float = 1e-3) -> list[float]:
    """``steps`` optimizer steps of a plain accelerate loop; returns each step's mean loss."""
    from accelerate import Accelerator

    acc = Accelerator(gradient_accumulation_steps=accumulate, cpu=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True)
    model, opt, loader = acc.prepare(model, opt, loader)
    model.train()
    losses: list[float] = []
    micro: list[float] = []
    while len(losses) < steps:
        for b in loader:
            with acc.accumulate(model):
                loss = model(**b)["loss"]
                acc.backward(loss)
                opt.step()
                opt.zero_grad()
            micro.append(loss.detach().item())
            if acc.sync_gradients:
                losses.append(sum(micro) / len(micro))
                micro = []
                if len(losses) == steps:
                    break
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a local transformers causal LM directory (default: a tiny random Llama)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=32)
    a = ap.parse_args()
    if a.model:
        decoder = load_decoder(a.model, impl="transformers")
        import pydoc_data.topics

        text = "\n".join(pydoc_data.topics.topics.values())[:200_000]
        tokens = torch.tensor(load_tokenizer(a.model).encode(text).ids)
    else:
        decoder = tiny_decoder()
        tokens = torch.randint(3, decoder.cfg.vocab_size, (64 * a.seq_len,), generator=torch.Generator().manual_seed(0))
    data = TokenDataset(tokens, a.seq_len)
    print("Trainer losses:", train_with_trainer(objective_model(decoder), data, a.steps))
    print("accelerate losses:", train_with_accelerate(objective_model(decoder), data, a.steps))


if __name__ == "__main__":
    main()

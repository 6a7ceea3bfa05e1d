"""``TrainConfig``: every setting of a training run (the JSON ``--config`` takes).

Its own module so that train.py, evaluate.py, demo.py and cli.py can all read it without
importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from .augment.coprocessor import CoprocessorConfig


@dataclass
class TrainConfig:
    """All settings of a training run (also the JSON accepted by ``--config``)."""

    model: str = "default"  # "default" (SmolLM2-135M), a HF dir / .gguf path, or "random:<config.json>"
    tokenizer: str | None = None  # None = the model's own; "bytes"; or a path
    data: list[str] = field(default_factory=list)  # text / JSONL files; empty = default corpus
    seq_len: int = 128
    batch_size: int = 4
    grad_accum: int = 1
    steps: int = 100
    lr: float = 1e-3
    soft_lr_mult: float = 1.0  # learning-rate multiplier for soft tokens and latent scale
    min_lr_ratio: float = 0.1
    warmup: int = 10
    weight_decay: float = 0.0
    clip: float = 1.0
    num_latents: int = 8
    ahead: int = 16
    positions: int = 8  # augmentation points per sequence per step
    min_prefix: int = 8  # smallest augmentation point drawn (tokens of context before the latents)
    placement: str = "paper"
    lora_rank: int = 32  # 0 = full fine-tune of a copy
    lora_alpha: float | None = None
    scale_mode: str = "learned"
    scale_init: float | None = None
    soft_init: str = "stats"
    init_from: str | None = None  # start from this coprocessor checkpoint (its coprocessor config wins)
    heldout_frac: float = 0.05
    max_chars: int | None = None
    eval_every: int = 0
    eval_seqs: int = 16
    save_every: int = 0
    out: str = "runs/cacheaug"
    seed: int = 0
    device: str = "auto"
    grad_checkpoint: bool = False
    threads: int | None = None
    stop_after: int | None = None  # stop this invocation after this many steps (schedule still uses `steps`)

    def validate(self) -> None:
        """Raise ValueError naming the first bad value."""
        positive = ("seq_len", "batch_size", "grad_accum", "num_latents", "ahead", "positions", "eval_seqs")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "warmup", "eval_every", "save_every", "lora_rank"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.min_prefix < 1:
            raise ValueError(f"min_prefix must be >= 1, got {self.min_prefix}")
        if self.positions + self.ahead + self.min_prefix >= self.seq_len + 2:
            raise ValueError(f"seq_len {self.seq_len} too short for {self.positions} positions with ahead={self.ahead}")
        CoprocessorConfig(**self.coprocessor_kwargs())

    def coprocessor_kwargs(self) -> dict[str, Any]:
        """The CoprocessorConfig fields these settings describe."""
        return dict(
            num_latents=self.num_latents,
            lora_rank=self.lora_rank or None,
            lora_alpha=self.lora_alpha,
            placement=self.placement,
            scale_mode=self.scale_mode,
            scale_init=self.scale_init,
            soft_init=self.soft_init,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict, rejecting unknown keys with a clear message."""
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown config keys: {', '.join(bad)}")
        return cls(**d)

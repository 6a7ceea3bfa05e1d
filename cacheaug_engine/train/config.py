"""``TrainConfig``: every setting of a training run (the JSON ``--config`` takes), and its flags.

Its own module so that the trainer, the evaluator's callers and the command line can all read it without
importing each other.

Each field is declared with :func:`setting`, whose metadata (help text, choices, metavar)
is all the command line needs: ``cli.args.add_train_flags`` derives one ``--flag-name`` per
field (type from the annotation: int, float, str, ``X | None``, ``list[str]`` -> nargs="+",
bool -> ``--x/--no-x``). Adding a field here gives ``cacheaug train`` and ``cacheaug demo``
its flag with no other edit; tests/cli/test_cli.py checks that fields and flags match one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from cacheaug_engine.augment.coprocessor import CoprocessorConfig
from cacheaug_engine.device import PRECISIONS
from cacheaug_engine.train.preflight import check_train_config


def setting(
    default: Any = None,
    help: str = "",
    *,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    factory: Any = None,
) -> Any:
    """A TrainConfig field whose metadata carries its command-line flag's help / choices / metavar."""
    meta = {"help": help, "choices": choices, "metavar": metavar}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """All settings of a training run (also the JSON accepted by ``--config``; one flag per field)."""

    model: str = setting("default", '"default" (SmolLM2-135M), a HF dir or .gguf, or "random:<config.json>"')
    decoder_impl: str = setting(
        "auto", "decoder for --model: native, transformers (any HF causal LM dir) or auto (native if it can)",
        choices=("auto", "native", "transformers"),
    )
    tokenizer: str | None = setting(None, 'tokenizer path or "bytes" (default: the model\'s own)')
    data: list[str] = setting(help="text or .jsonl files (default: Python's docs)", metavar="FILE", factory=list)
    seq_len: int = setting(128, "tokens per packed sequence")
    batch_size: int = setting(4, "sequences per micro-batch")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    steps: int = setting(100, "optimizer steps")
    lr: float = setting(1e-3, "peak learning rate")
    soft_lr_mult: float = setting(1.0, "learning-rate multiplier of soft tokens and latent scale")
    min_lr_ratio: float = setting(0.1, "final lr / peak lr of the cosine schedule")
    warmup: int = setting(10, "linear warmup steps")
    weight_decay: float = setting(0.0, "AdamW weight decay (adapters / weights only)")
    clip: float = setting(1.0, "gradient-norm clip (0 = off)")
    num_latents: int = setting(8, "N_L, latents per augmentation point")
    ahead: int = setting(16, "N_A, target tokens scored after each point")
    positions: int = setting(8, "augmentation points per sequence per step")
    min_prefix: int = setting(8, "smallest augmentation point (context tokens before the latents)")
    placement: str = setting("paper", "latents after the prefix, or one token earlier", choices=("paper", "early"))
    shift_tokens: bool | None = setting(
        None, "tokens after the latents move N_L positions on (the paper; default) or keep their own "
        "(--no-shift-tokens); default: as the --init-from checkpoint, else shifted",
    )
    lora_rank: int = setting(32, "LoRA rank (0 = full fine-tune of a copy)")
    lora_alpha: float | None = setting(None, "LoRA alpha (default = rank)")
    scale_mode: str = setting("learned", "latent output scale", choices=("none", "fixed", "learned"))
    scale_init: float | None = setting(None, "initial latent scale (default: embedding RMS / hidden RMS)")
    soft_init: str = setting("stats", "soft-token initialisation", choices=("stats", "tokens"))
    latents: str = setting(
        "coprocessor",
        "pause = the Pause Token control: a trained constant table, no coprocessor",
        choices=("coprocessor", "pause"),
    )
    center: bool = setting(False, "latents = trained constant + the coprocessor's deviation from its mean latent")
    contrast: float = setting(0.0, "weight of a hinge term: CE with real latents below CE with shuffled ones")
    contrast_margin: float = setting(0.0, "margin (nats) of the contrast hinge")
    first_weight: float = setting(1.0, "loss weight of each point's first target (others 1; a weighted mean)")
    init_from: str | None = setting(
        None, "start from this coprocessor checkpoint (its coprocessor config wins)", metavar="CKPT"
    )
    heldout_frac: float = setting(0.05, "fraction of documents held out")
    max_chars: int | None = setting(None, "use at most this many characters of training text")
    eval_every: int = setting(0, "held-out eval every N steps (0 = off)")
    eval_seqs: int = setting(16, "held-out sequences per eval")
    save_every: int = setting(0, "checkpoint every N steps (always at the end)")
    out: str = setting("runs/cacheaug", "output directory (checkpoint in OUT/checkpoint)")
    seed: int = setting(0, "random seed")
    device: str = setting("auto", '"auto", "cpu" or "cuda"')
    grad_checkpoint: bool = setting(False, "recompute activations in backward")
    precision: str = setting(
        "auto",
        "auto: bf16 autocast on CUDA, fp32 on the CPU; bf16: bf16 autocast (fp32 weights); bf16-weights: the "
        "frozen decoder held in bf16, trainable tensors fp32, under bf16 autocast",
        choices=PRECISIONS,
    )
    compile: bool = setting(
        False, "torch.compile the decoder layers' element-wise regions (RMSNorm, RoPE, gated activation; the "
        "GEMMs stay on oneDNN / cuBLAS); the native decoder only",
    )
    threads: int | None = setting(None, "torch CPU threads")
    stop_after: int | None = setting(None, "stop this run after N steps (the schedule still spans --steps)")
    distributed: str | None = setting(
        None, "under torchrun: DDP or FSDP2 (--batch-size is per rank)", choices=("ddp", "fsdp")
    )
    dist_timeout: float = setting(300.0, "seconds a collective waits for the other ranks before failing")

    def validate(self) -> None:
        """Raise ValueError naming the first bad value: types, finiteness and ranges (checked once, in
        train/preflight.py ``check_train_config``), then the coprocessor's own settings."""
        check_train_config(self)
        CoprocessorConfig(**self.coprocessor_kwargs())

    def coprocessor_kwargs(self) -> dict[str, Any]:
        """The CoprocessorConfig fields these settings describe."""
        return dict(
            num_latents=self.num_latents,
            lora_rank=self.lora_rank or None,
            lora_alpha=self.lora_alpha,
            placement=self.placement,
            shift_tokens=True if self.shift_tokens is None else self.shift_tokens,
            scale_mode=self.scale_mode,
            scale_init=self.scale_init,
            soft_init=self.soft_init,
            latents=self.latents,
            center=self.center,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict, rejecting unknown keys with a clear message."""
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown config keys: {', '.join(bad)}")
        return cls(**d)

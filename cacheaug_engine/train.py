"""Training a coprocessor: AdamW, warmup + cosine, clipping, accumulation, checkpoints, exact resume.

``train(TrainConfig(...))`` is what ``cacheaug train`` and ``cacheaug demo`` run. Everything a
resumed run needs to continue bit-for-bit is in the checkpoint: trainable weights, optimizer
state, step (the schedule is a function of it), the data loader's position, the RNG states
(global torch and the objective's position sampler) and the loss history.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .augment.coprocessor import Coprocessor, CoprocessorConfig
from .augment.objective import CacheAugmentationObjective
from .checkpoint import (
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    restore_rng,
    rng_tensors,
    save_checkpoint,
)
from .data import ByteTokenizer, Corpus, SequenceLoader, load_corpus
from .evaluate import evaluate_objective, format_table, report_table


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


# -- model / tokenizer -----------------------------------------------------------------------------
def load_model(spec: str, device: str | torch.device = "cpu"):
    """A frozen Decoder for "default", a model path, or "random:<config.json>" (fp32)."""
    from .models import Decoder, DecoderConfig, default_model_path, load_decoder

    if spec.startswith("random:"):
        cfg_path = Path(spec[len("random:") :])
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path}: no such decoder config file")
        cfg = DecoderConfig.from_dict(json.loads(cfg_path.read_text()))
        model = Decoder.from_config(cfg, dtype=torch.float32, seed=0)
    elif spec == "default":
        model = load_decoder(default_model_path())
    else:
        if not Path(spec).exists():
            raise FileNotFoundError(f"{spec}: no such model file or directory")
        model = load_decoder(spec)
    return model.to(device)


def load_tok(spec: str | None, model_spec: str) -> Any:
    """The tokenizer: "bytes", a path, or (None) the model's own."""
    from .models import default_model_path, load_tokenizer

    if spec == "bytes":
        return ByteTokenizer()
    if spec is None:
        if model_spec.startswith("random:"):
            return ByteTokenizer()
        spec = str(default_model_path()) if model_spec == "default" else model_spec
    if not Path(spec).exists():
        raise FileNotFoundError(f"{spec}: no such tokenizer file or directory")
    return load_tokenizer(spec)


def pick_device(name: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no CUDA device is available")
    return dev


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_lr_ratio * lr`` at ``steps``."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    frac = min(max(step - cfg.warmup, 0) / span, 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


@dataclass
class TrainResult:
    """What ``train`` returns."""

    coprocessor: Coprocessor
    objective: CacheAugmentationObjective
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    checkpoint: Path | None
    seconds: float


def build_coprocessor(decoder, cfg: TrainConfig, log: Callable[[str], None] = print) -> tuple[Coprocessor, Any]:
    """A fresh coprocessor from ``cfg``, or one loaded from ``cfg.init_from`` (returns it and that ckpt)."""
    if cfg.init_from:
        ck = load_checkpoint(cfg.init_from, with_optimizer=False)
        ccfg = CoprocessorConfig.from_dict(ck.coprocessor_config)
        cop = Coprocessor(decoder, config=ccfg, seed=cfg.seed)
        cop.load_trainable_state(ck.coprocessor)
        log(f"initialised the coprocessor from {ck.path} (step {ck.state.get('step')})")
        return cop, ck
    return Coprocessor(decoder, config=CoprocessorConfig(**cfg.coprocessor_kwargs()), seed=cfg.seed), None


def make_optimizer(cop: Coprocessor, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable tensors; soft tokens / scale get ``soft_lr_mult`` and no decay."""
    main, small = [], []
    for name, p in cop.named_parameters():
        if p.requires_grad:
            (small if name in ("soft_tokens", "log_scale") else main).append(p)
    groups = [
        {"params": main, "weight_decay": cfg.weight_decay, "lr_mult": 1.0},
        {"params": small, "weight_decay": 0.0, "lr_mult": cfg.soft_lr_mult},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.99))


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    decoder: Any = None,
    corpus: Corpus | None = None,
    tokenizer: Any = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Run (or resume) training as ``cfg`` says; checkpoints go to ``<out>/checkpoint``."""
    cfg.validate()
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = pick_device(cfg.device)
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint"
    resumed = None
    if resume:
        resumed = load_checkpoint(ckpt_path)
        saved = TrainConfig.from_dict(resumed.state["train_config"])
        for key in ("seq_len", "batch_size", "positions", "ahead", "seed", "data", "model"):
            if getattr(saved, key) != getattr(cfg, key):
                raise ValueError(f"--resume: {key} differs from the checkpoint ({getattr(saved, key)!r})")
    if decoder is None:
        decoder = load_model(cfg.model, dev)
    if tokenizer is None and corpus is None:
        tokenizer = load_tok(cfg.tokenizer, cfg.model)
    if corpus is None:
        corpus = load_corpus(
            tokenizer,
            cfg.seq_len,
            files=cfg.data or None,
            heldout_frac=cfg.heldout_frac,
            seed=0,
            max_chars=cfg.max_chars,
        )
        log(f"data: {corpus.describe()}")
    torch.manual_seed(cfg.seed)
    if resumed is not None:
        ccfg = CoprocessorConfig.from_dict(resumed.coprocessor_config)
        cop = Coprocessor(decoder, config=ccfg, seed=cfg.seed)
        cop.load_trainable_state(resumed.coprocessor)
    else:
        cop, _ = build_coprocessor(decoder, cfg, log)
    cop.to(dev)
    objective = CacheAugmentationObjective(
        decoder,
        cop,
        ahead=cfg.ahead,
        num_positions=cfg.positions,
        grad_checkpoint=cfg.grad_checkpoint,
        min_prefix=cfg.min_prefix,
    )
    objective.generator.manual_seed(cfg.seed + 1)
    opt = make_optimizer(cop, cfg)
    loader = SequenceLoader(corpus.train, cfg.batch_size, seed=cfg.seed)
    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    step = 0
    if resumed is not None:
        opt.load_state_dict(optimizer_from_flat(resumed.optimizer_tensors, resumed.state["optimizer"]))
        loader.load_state_dict(resumed.state["loader"])
        history = list(resumed.state.get("history", []))
        evals = list(resumed.state.get("evals", []))
        step = int(resumed.state["step"])
        restore_rng(resumed, {"positions": objective.generator})
        log(f"resumed from {resumed.path} at step {step}")
    amp = torch.bfloat16 if dev.type == "cuda" else None
    params = [p for p in cop.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    kind = "full copy" if cop.config.lora_rank is None else f"LoRA r={cop.config.lora_rank}"
    log(
        f"coprocessor: {n_train / 1e6:.2f}M trainable parameters ({kind}), N_L={cop.num_latents}, "
        f"N_A={cfg.ahead}, {cfg.positions} positions/sequence, placement={cop.placement}"
    )

    def save(at_step: int) -> Path:
        tensors, meta = optimizer_to_flat(opt.state_dict())
        tensors.update(rng_tensors({"positions": objective.generator}))
        state = {
            "coprocessor": cop.config.to_dict(),
            "train_config": asdict(cfg),
            "step": at_step,
            "loader": loader.state_dict(),
            "optimizer": meta,
            "history": history,
            "evals": evals,
            "decoder": cfg.model,
            "lr": lr_at(max(at_step - 1, 0), cfg),
        }
        return save_checkpoint(ckpt_path, coprocessor=cop.trainable_state(), state=state, optimizer_tensors=tensors)

    def run_eval(at_step: int) -> None:
        held = corpus.heldout[: cfg.eval_seqs]
        if held.shape[0] == 0:
            return
        res = evaluate_objective(objective, held, batch_size=cfg.batch_size, autocast_dtype=amp)
        tab = report_table(res)
        evals.append({"step": at_step, **res, "table": tab})
        log(format_table(tab, f"held-out eval at step {at_step} ({held.shape[0]} sequences)"))

    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, step + cfg.stop_after)
    bar = None
    if progress and end > step:
        from tqdm import tqdm

        bar = tqdm(total=end - step, desc="train", dynamic_ncols=True, file=sys.stderr)
    ckpt = None
    tok_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    cop.train()
    while step < end:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        loss_sum, base_sum, pos1_a, pos1_b = 0.0, 0.0, 0.0, 0.0
        for _ in range(cfg.grad_accum):
            ids = loader.next_batch().to(dev)
            if amp is not None:
                with torch.autocast(dev.type, dtype=amp):
                    res = objective(ids)
            else:
                res = objective(ids)
            (res.loss / cfg.grad_accum).backward()
            loss_sum += res.loss.item() / cfg.grad_accum
            base_sum += res.ce_base.mean().item() / cfg.grad_accum
            pos1_a += res.ce_aug[..., 0].mean().item() / cfg.grad_accum
            pos1_b += res.ce_base[..., 0].mean().item() / cfg.grad_accum
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip)) if cfg.clip > 0 else float("nan")
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0
        history.append(
            {
                "step": step,
                "loss": loss_sum,
                "baseline": base_sum,
                "pos1": pos1_a,
                "pos1_baseline": pos1_b,
                "lr": lr,
                "grad_norm": gnorm,
                "seconds": dt,
            }
        )
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss_sum:.3f}",
                base=f"{base_sum:.3f}",
                p1=f"{pos1_a:.2f}/{pos1_b:.2f}",
                tok_s=f"{tok_per_step / dt:.0f}",
            )
        if cfg.eval_every and step % cfg.eval_every == 0:
            run_eval(step)
        if (cfg.save_every and step % cfg.save_every == 0) or step == end:
            ckpt = save(step)
    if bar is not None:
        bar.close()
    if ckpt is None and step > 0 and not (ckpt_path / "state.json").exists():
        ckpt = save(step)
    return TrainResult(
        cop,
        objective,
        history,
        evals,
        ckpt or (ckpt_path if ckpt_path.exists() else None),
        time.perf_counter() - t_start,
    )

"""Training a coprocessor: AdamW, warmup + cosine, clipping, accumulation, checkpoints, exact resume.

``train(TrainConfig(...))`` is what ``cacheaug train`` and ``cacheaug demo`` run. Everything a
resumed run needs to continue bit-for-bit is in the checkpoint: trainable weights, optimizer
state, step (the schedule is a function of it), the data loader's position, the RNG states
(global torch and the objective's position sampler) and the loss history.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from .augment.coprocessor import Coprocessor, CoprocessorConfig
from .augment.objective import CacheAugmentationObjective
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    restore_rng,
    rng_tensors,
    save_checkpoint,
)
from .data import Corpus, SequenceLoader, load_corpus
from .dist_checkpoint import (
    MARKER,
    export_dist_checkpoint,
    load_dist_checkpoint,
    read_train_state,
    save_dist_checkpoint,
)
from .distributed import grad_sync, init_distributed, memory_report, root_unsharded, shutdown, wrap
from .numerics import check_step_finite, grad_norm
from .preflight import check_resume, check_run_inputs
from .report import format_controls, run_controls, summary
from .startup import autocast, autocast_dtype, coprocessor_from_checkpoint, load_model, load_tok, pick_device
from .train_config import TrainConfig


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


def _silent(_msg: str) -> None:
    """The log of ranks other than 0."""


def build_coprocessor(decoder, cfg: TrainConfig, log: Callable[[str], None] = print) -> tuple[Coprocessor, Any]:
    """A fresh coprocessor from ``cfg``, or one loaded from ``cfg.init_from`` (returns it and that ckpt)."""
    if cfg.init_from:
        ck = load_checkpoint(cfg.init_from, with_optimizer=False)
        cop = coprocessor_from_checkpoint(decoder, ck, seed=cfg.seed)
        log(f"initialised the coprocessor from {ck.path} (step {ck.state.get('step')})")
        return cop, ck
    return Coprocessor(decoder, config=CoprocessorConfig(**cfg.coprocessor_kwargs()), seed=cfg.seed), None


def with_coprocessor_settings(cfg: TrainConfig, copro: dict[str, Any]) -> TrainConfig:
    """``cfg`` with its coprocessor fields (num_latents, lora_rank, ...) taken from a CoprocessorConfig dict."""
    names = {f.name for f in fields(cfg)}
    upd = {k: v for k, v in copro.items() if k in names and k in cfg.coprocessor_kwargs()}
    if "lora_rank" in upd and upd["lora_rank"] is None:
        upd["lora_rank"] = 0  # TrainConfig's spelling of a full copy
    return replace(cfg, **upd)


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
    out = check_run_inputs(cfg)  # before any loading: a bad --data or unwritable --out fails now, not later
    # under torchrun: every rank draws the global batch, keeps its rows; rank 0 alone logs and reports
    ctx = init_distributed(cfg.distributed, cfg.device, cfg.dist_timeout) if cfg.distributed else None
    world = ctx.world_size if ctx else 1
    if ctx is not None and not ctx.is_main:
        progress, log = False, _silent
    ckpt_path = out / ("checkpoint-dist" if ctx else "checkpoint")
    resumed = None
    if resume:
        try:
            resumed = read_train_state(ckpt_path) if ctx else load_checkpoint(ckpt_path)
        except CheckpointError as e:
            raise CheckpointError(f"--resume: {e}") from None
        if cfg.init_from:  # the coprocessor's settings come from the checkpoint, not from flags
            cfg = with_coprocessor_settings(cfg, resumed.coprocessor_config)
        saved = dict(resumed.train_config())
        if ctx is not None:  # any world size resumes, if the global batch stays the same
            if cfg.batch_size * world != resumed.state["global_batch"]:
                raise ValueError(f"--resume: global batch {cfg.batch_size * world} != checkpoint's "
                                 f"{resumed.state['global_batch']} (--batch-size is per rank)")  # fmt: skip
            saved["batch_size"] = cfg.batch_size
        check_resume(saved, cfg, resumed.path)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = ctx.device if ctx else pick_device(cfg.device)
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
    if resumed is not None and ctx is not None:  # tensors are loaded in place after wrapping
        cop = Coprocessor(decoder, config=CoprocessorConfig.from_dict(resumed.coprocessor_config), seed=cfg.seed)
    elif resumed is not None:
        cop = coprocessor_from_checkpoint(decoder, resumed, seed=cfg.seed)
    else:
        cop, init = build_coprocessor(decoder, cfg, log)
        if init is not None:  # record the shapes the tensors have, not the flags' defaults
            cfg = with_coprocessor_settings(cfg, cop.config.to_dict())
    cop.to(dev)
    objective = CacheAugmentationObjective(
        decoder,
        cop,
        ahead=cfg.ahead,
        num_positions=cfg.positions,
        grad_checkpoint=cfg.grad_checkpoint,
        min_prefix=cfg.min_prefix,
        contrast=cfg.contrast,
        contrast_margin=cfg.contrast_margin,
    )
    objective.generator.manual_seed(cfg.seed + 1)
    model = wrap(objective, ctx) if ctx else objective
    opt = make_optimizer(cop, cfg)
    loader = SequenceLoader(corpus.train, cfg.batch_size * world, seed=cfg.seed)
    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    step = 0
    last_saved: tuple[int, Path] | None = None
    gens = {"positions": objective.generator}
    if resumed is not None:
        if ctx is not None:
            load_dist_checkpoint(ckpt_path, objective=objective, model=model, opt=opt, generators=gens)
        else:
            opt.load_state_dict(optimizer_from_flat(resumed.optimizer_tensors, resumed.state["optimizer"]))
            restore_rng(resumed, gens)
        loader.load_state_dict(resumed.state["loader"])
        history = list(resumed.state.get("history", []))
        evals = list(resumed.state.get("evals", []))
        step = int(resumed.state["step"])
        last_saved = (step, resumed.path)
        log(f"resumed from {resumed.path} at step {step}")
    amp = autocast_dtype(dev)
    params = [p for p in cop.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    kind = "full copy" if cop.config.lora_rank is None else f"LoRA r={cop.config.lora_rank}"
    kind = "a pause table: no coprocessor" if cop.is_pause else kind
    log(
        f"coprocessor: {n_train / 1e6:.2f}M trainable parameters ({kind}), N_L={cop.num_latents}, "
        f"N_A={cfg.ahead}, {cfg.positions} positions/sequence, placement={cop.placement}"
    )
    if ctx is not None:
        log(memory_report(objective, ctx))

    def save(at_step: int) -> Path:
        state = {
            "coprocessor": cop.config.to_dict(),
            "train_config": asdict(cfg),
            "step": at_step,
            "loader": loader.state_dict(),
            "history": history,
            "evals": evals,
            "decoder": cfg.model,
            "lr": lr_at(max(at_step - 1, 0), cfg),
        }
        if ctx is not None:
            state.update(world_size=world, global_batch=cfg.batch_size * world)
            return save_dist_checkpoint(
                ckpt_path, objective=objective, model=model, opt=opt, generators=gens, state=state
            )
        tensors, meta = optimizer_to_flat(opt.state_dict())
        tensors.update(rng_tensors(gens))
        state["optimizer"] = meta
        return save_checkpoint(ckpt_path, coprocessor=cop.trainable_state(), state=state, optimizer_tensors=tensors)

    def run_eval(at_step: int) -> None:
        held = corpus.heldout[: cfg.eval_seqs]
        if held.shape[0] == 0:
            return
        # with the controls: shuffled latents and the mean latent over as many training sequences
        with root_unsharded(model, ctx):
            res, tab = run_controls(
                objective, held, corpus.train[: cfg.eval_seqs], batch_size=cfg.batch_size, autocast_dtype=amp
            )
        evals.append({"step": at_step, "seconds": res["seconds"], "summary": summary(tab), "table": tab})
        log(format_controls(tab, f"held-out eval at step {at_step} ({held.shape[0]} sequences)"))

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
        for micro in range(cfg.grad_accum):
            ids, positions = loader.next_batch(), None
            if ctx is not None:  # points drawn for the global batch, then this rank's rows of both
                positions = ctx.shard(objective.sample(ids.shape[0], ids.shape[1]))
                ids = ctx.shard(ids)
            ids = ids.to(dev)
            with grad_sync(model, ctx, micro == cfg.grad_accum - 1) if ctx else contextlib.nullcontext():
                with autocast(dev, amp):
                    res = model(ids, positions)
                (res.loss / cfg.grad_accum).backward()
            loss_sum += res.loss.item() / cfg.grad_accum
            base_sum += res.ce_base.mean().item() / cfg.grad_accum
            pos1_a += res.ce_aug[..., 0].mean().item() / cfg.grad_accum
            pos1_b += res.ce_base[..., 0].mean().item() / cfg.grad_accum
        if ctx is not None:  # equal targets per rank: the global mean is the mean of the ranks' means
            loss_sum, base_sum, pos1_a, pos1_b = (v / world for v in ctx.all_sum([loss_sum, base_sum, pos1_a, pos1_b]))
        gnorm = grad_norm(params, cfg.clip)
        try:
            check_step_finite(step + 1, loss_sum, gnorm, last_saved)
        finally:
            if bar is not None and not (math.isfinite(loss_sum) and math.isfinite(gnorm)):
                bar.close()
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
            last_saved = (step, ckpt)
    if bar is not None:
        bar.close()
    if ckpt is None and step > 0 and not (ckpt_path / (MARKER if ctx else "state.json")).exists():
        ckpt = save(step)
    if ctx is not None:  # the single-directory format eval / generate / demo read
        if ctx.is_main and ckpt is not None:
            log(f"exported {export_dist_checkpoint(ckpt_path, out / 'coprocessor')} (from {ckpt_path})")
        ctx.barrier()
        shutdown(ctx)
    return TrainResult(
        cop,
        objective,
        history,
        evals,
        ckpt or (ckpt_path if ckpt_path.exists() else None),
        time.perf_counter() - t_start,
    )

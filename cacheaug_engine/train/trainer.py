"""Training a coprocessor: AdamW, warmup + cosine, clipping, accumulation, checkpoints, exact resume.

``Trainer(cfg)`` builds a run (decoder, data, coprocessor, objective, optimizer), ``fit()`` runs it;
``train(cfg)`` is the two in one call and is what ``cacheaug train`` and ``cacheaug demo`` run.
The Trainer is stateful in torch's sense (``state_dict`` / ``load_state_dict``, as torchtitan's):
everything a resumed run needs to continue bit-for-bit - trainable weights, optimizer state, step
(the schedule is a function of it), the data loader's position, the RNG states (global torch and the
objective's position sampler) and the loss and eval history - and nothing else.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from cacheaug_engine.augment.coprocessor import Coprocessor, CoprocessorConfig
from cacheaug_engine.augment.objective import CacheAugmentationObjective
from cacheaug_engine.data.corpus import Corpus, SequenceLoader, load_corpus
from cacheaug_engine.data.text import load_tok
from cacheaug_engine.device import autocast, autocast_dtype, pick_device, slow_bf16_note
from cacheaug_engine.eval.evaluator import run_controls, summary
from cacheaug_engine.eval.tables import format_controls
from cacheaug_engine.models.compiled import check_compilable, compile_regions
from cacheaug_engine.models.loaders import load_model
from cacheaug_engine.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    coprocessor_from_checkpoint,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    restore_rng,
    rng_tensors,
    save_checkpoint,
    trained_for,
)
from cacheaug_engine.train.config import TrainConfig
from cacheaug_engine.train.dist_checkpoint import (
    MARKER,
    export_dist_checkpoint,
    load_dist_checkpoint,
    read_train_state,
    save_dist_checkpoint,
)
from cacheaug_engine.train.distributed import grad_sync, init_distributed, memory_report, root_unsharded, shutdown, wrap
from cacheaug_engine.train.numerics import check_step_finite, grad_norm
from cacheaug_engine.train.preflight import check_resume, check_resume_step, check_run_inputs, other_hint


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_lr_ratio * lr`` at ``steps``."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    frac = min(max(step - cfg.warmup, 0) / span, 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


@dataclass
class TrainResult:
    """What ``Trainer.fit`` / ``train`` return."""

    coprocessor: Coprocessor
    objective: CacheAugmentationObjective
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    checkpoint: Path | None
    seconds: float


def _silent(_msg: str) -> None:
    """The log of ranks other than 0."""


def build_coprocessor(
    decoder, cfg: TrainConfig, log: Callable[[str], None] = print, tokenizer: Any = None
) -> tuple[Coprocessor, Any]:
    """A fresh coprocessor from ``cfg``, or one loaded from ``cfg.init_from`` (returns it and that ckpt;
    CheckpointError when that checkpoint was trained on another decoder or tokenizer)."""
    if cfg.init_from:
        ck = load_checkpoint(cfg.init_from, with_optimizer=False)
        cop = coprocessor_from_checkpoint(decoder, ck, seed=cfg.seed, tokenizer=tokenizer)
        log(f"initialised the coprocessor from {ck.path} (step {ck.state.get('step')})")
        if cfg.shift_tokens is not None and cfg.shift_tokens != cop.shift_tokens:
            # position ids are not in the tensors' meaning: a fine-tune may move to the other layout
            cop.config = replace(cop.config, shift_tokens=cfg.shift_tokens)
            log(f"shift_tokens: {not cfg.shift_tokens} in {ck.path}, {cfg.shift_tokens} from here on")
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


class Trainer:
    """One training run of a coprocessor, built from a TrainConfig.

    ``Trainer(cfg, resume=True)`` continues exactly from ``<out>/checkpoint`` (or the sharded
    ``<out>/checkpoint-dist`` under torchrun). ``step()`` takes one optimizer step, ``evaluate()``
    scores the held-out split against the controls, ``save()`` writes a checkpoint atomically,
    ``fit()`` runs to ``cfg.steps`` (or ``stop_after`` more steps). ``decoder``, ``corpus`` and
    ``tokenizer`` may be given to skip loading them.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: bool = False,
        decoder: Any = None,
        corpus: Corpus | None = None,
        tokenizer: Any = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.t_start = time.perf_counter()
        cfg.validate()
        self.out = check_run_inputs(cfg)  # before any loading: a bad --data or unwritable --out fails now
        # under torchrun: every rank draws the global batch, keeps its rows; rank 0 alone logs and reports
        ctx = init_distributed(cfg.distributed, cfg.device, cfg.dist_timeout) if cfg.distributed else None
        self.ctx = ctx
        self.world = ctx.world_size if ctx else 1
        self.log = _silent if ctx is not None and not ctx.is_main else log
        self.ckpt_path = self.out / ("checkpoint-dist" if ctx else "checkpoint")
        resumed = self._read_resume_state(cfg) if resume else None
        if resumed is not None and cfg.init_from:  # the coprocessor's settings come from the checkpoint
            cfg = with_coprocessor_settings(cfg, resumed.coprocessor_config)
        if resumed is not None:
            self._check_resume(cfg, resumed)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = ctx.device if ctx else pick_device(cfg.device)
        if cfg.compile:
            check_compilable(self.device)
        self.decoder = decoder if decoder is not None else load_model(cfg.model, self.device, impl=cfg.decoder_impl)
        if cfg.precision == "bf16-weights":  # frozen weights in bf16; trainable tensors stay fp32 (below)
            self.decoder.to(torch.bfloat16)
        if corpus is None:
            tokenizer = tokenizer if tokenizer is not None else load_tok(cfg.tokenizer, cfg.model)
            corpus = load_corpus(
                tokenizer, cfg.seq_len, files=cfg.data or None, heldout_frac=cfg.heldout_frac, seed=0,
                max_chars=cfg.max_chars,
            )
            self.log(f"data: {corpus.describe()}")
        self.corpus = corpus
        self.tokenizer = tokenizer
        torch.manual_seed(cfg.seed)
        if resumed is not None:  # tensors are loaded after the optimizer exists (load_state_dict)
            cop = Coprocessor(self.decoder, config=CoprocessorConfig.from_dict(resumed.coprocessor_config),
                              seed=cfg.seed)
        else:
            cop, init = build_coprocessor(self.decoder, cfg, self.log, tokenizer)
            if init is not None:  # record the shapes the tensors have, not the flags' defaults
                cfg = with_coprocessor_settings(cfg, cop.config.to_dict())
        self.cfg = cfg
        self.coprocessor = cop.to(self.device)
        for p in cop.parameters():  # fp32 master copies of what trains, whatever the frozen weights' dtype
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        self.objective = CacheAugmentationObjective(
            self.decoder, cop, ahead=cfg.ahead, num_positions=cfg.positions, grad_checkpoint=cfg.grad_checkpoint,
            min_prefix=cfg.min_prefix, contrast=cfg.contrast, contrast_margin=cfg.contrast_margin,
            first_weight=cfg.first_weight,
        )
        self.objective.generator.manual_seed(cfg.seed + 1)
        if cfg.compile and compile_regions(self.objective) == 0:
            raise ValueError(f"--compile: the decoder ({type(self.decoder).__name__}) has no regions to compile; "
                             "only the native decoder has them")
        self.model = wrap(self.objective, ctx) if ctx else self.objective
        self.optimizer = make_optimizer(cop, cfg)
        self.loader = SequenceLoader(corpus.train, cfg.batch_size * self.world, seed=cfg.seed)
        self.generators = {"positions": self.objective.generator}
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.step_count = 0
        self.last_saved: tuple[int, Path] | None = None
        self.amp = autocast_dtype(self.device, cfg.precision)
        if (slow := slow_bf16_note(self.device, self.amp)) is not None:
            self.log(f"note: --precision {cfg.precision}: {slow}")
        self.params = [p for p in cop.parameters() if p.requires_grad]
        if resumed is not None:
            if ctx is not None:
                load_dist_checkpoint(self.ckpt_path, objective=self.objective, model=self.model, opt=self.optimizer,
                                     generators=self.generators)
                self._load_progress(resumed.state)
            else:
                self.load_state_dict(self._state_of(resumed))
            self.last_saved = (self.step_count, resumed.path)
            self.log(f"resumed from {resumed.path} at step {self.step_count}")
        self._describe()

    # -- set-up ------------------------------------------------------------------------------------
    def _read_resume_state(self, cfg: TrainConfig) -> Checkpoint:
        try:
            return read_train_state(self.ckpt_path) if self.ctx else load_checkpoint(self.ckpt_path)
        except CheckpointError as e:
            other = self.out / ("checkpoint" if self.ctx else "checkpoint-dist")
            if not self.ckpt_path.exists() and other.exists():
                raise CheckpointError(f"--resume: {self.ckpt_path}: no such checkpoint, but {other_hint(other)}") \
                    from None
            raise CheckpointError(f"--resume: {e}") from None

    def _check_resume(self, cfg: TrainConfig, resumed: Checkpoint) -> None:
        check_resume_step(resumed.state.get("step", 0), cfg.steps, resumed.path)
        saved = dict(resumed.train_config())
        if self.ctx is not None:  # any world size resumes, if the global batch stays the same
            if cfg.batch_size * self.world != resumed.state["global_batch"]:
                raise ValueError(f"--resume: global batch {cfg.batch_size * self.world} != checkpoint's "
                                 f"{resumed.state['global_batch']} (--batch-size is per rank)")  # fmt: skip
            saved["batch_size"] = cfg.batch_size
        check_resume(saved, cfg, resumed.path)

    def _describe(self) -> None:
        cop = self.coprocessor
        n_train = sum(p.numel() for p in self.params)
        kind = "full copy" if cop.config.lora_rank is None else f"LoRA r={cop.config.lora_rank}"
        kind = "a pause table: no coprocessor" if cop.is_pause else kind
        self.log(
            f"coprocessor: {n_train / 1e6:.2f}M trainable parameters ({kind}), N_L={cop.num_latents}, "
            f"N_A={self.cfg.ahead}, {self.cfg.positions} positions/sequence, placement={cop.placement}"
        )
        if self.ctx is not None:
            self.log(memory_report(self.objective, self.ctx))

    # -- state -------------------------------------------------------------------------------------
    def _progress(self) -> dict[str, Any]:
        return {
            "coprocessor": self.coprocessor.config.to_dict(),
            "train_config": asdict(self.cfg),
            "step": self.step_count,
            "loader": self.loader.state_dict(),
            "history": self.history,
            "evals": self.evals,
            "decoder": self.cfg.model,
            **trained_for(self.decoder, self.tokenizer),
            "lr": lr_at(max(self.step_count - 1, 0), self.cfg),
        }

    def _load_progress(self, state: dict[str, Any]) -> None:
        try:
            self.loader.load_state_dict(state["loader"])
        except ValueError as e:  # a position past this corpus would silently wrap into another epoch
            raise CheckpointError(f"--resume: {self.ckpt_path}: {e}") from None
        self.history = list(state.get("history", []))
        self.evals = list(state.get("evals", []))
        self.step_count = int(state["step"])

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (plain, single-process form): ``coprocessor`` (trainable
        tensors), ``optimizer`` (torch's optimizer state dict), ``rng`` (state tensors by name) and
        ``state`` (step, loader position, history, evals and the settings the run was made with)."""
        return {
            "coprocessor": self.coprocessor.trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_tensors(self.generators),
            "state": self._progress(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the coprocessor's shape must match)."""
        self.coprocessor.load_trainable_state(sd["coprocessor"])
        # torch's Optimizer.load_state_dict keeps the given state tensors when dtype and device match: a
        # copy, so that a state_dict taken from a live Trainer is not shared with it
        self.optimizer.load_state_dict(copy.deepcopy(sd["optimizer"]))
        restore_rng(Checkpoint(self.ckpt_path, {}, {}, dict(sd["rng"])), self.generators)
        self._load_progress(sd["state"])

    @staticmethod
    def _state_of(ckpt: Checkpoint) -> dict[str, Any]:
        """A loaded plain checkpoint as a :meth:`state_dict`."""
        rng = {k: v for k, v in ckpt.optimizer_tensors.items() if k.startswith("rng.")}
        return {
            "coprocessor": ckpt.coprocessor,
            "optimizer": optimizer_from_flat(ckpt.optimizer_tensors, ckpt.state["optimizer"]),
            "rng": rng,
            "state": ckpt.state,
        }

    def save(self) -> Path:
        """Write the checkpoint of the current step atomically (``<out>/checkpoint``)."""
        state = self._progress()
        if self.ctx is not None:
            state.update(world_size=self.world, global_batch=self.cfg.batch_size * self.world)
            path = save_dist_checkpoint(self.ckpt_path, objective=self.objective, model=self.model,
                                        opt=self.optimizer, generators=self.generators, state=state)
        else:
            sd = self.state_dict()
            tensors, meta = optimizer_to_flat(sd["optimizer"])
            tensors.update(sd["rng"])
            state["optimizer"] = meta
            path = save_checkpoint(self.ckpt_path, coprocessor=sd["coprocessor"], state=state,
                                   optimizer_tensors=tensors)
        self.last_saved = (self.step_count, path)
        return path

    # -- work --------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any] | None:
        """Held-out per-position perplexity against the controls (shuffled latents, the mean latent over
        as many training sequences); appended to ``evals`` and logged. None without held-out data."""
        cfg = self.cfg
        held = self.corpus.heldout[: cfg.eval_seqs]
        if held.shape[0] == 0:
            return None
        with root_unsharded(self.model, self.ctx):
            res, tab = run_controls(self.objective, held, self.corpus.train[: cfg.eval_seqs],
                                    batch_size=cfg.batch_size, autocast_dtype=self.amp)
        row = {"step": self.step_count, "seconds": res["seconds"], "summary": summary(tab), "table": tab}
        self.evals.append(row)
        self.log(format_controls(tab, f"held-out eval at step {self.step_count} ({held.shape[0]} sequences)"))
        return row

    def step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (and records) its history row.
        Raises NonFiniteLossError (naming the last good checkpoint) on a NaN/Inf loss or gradient."""
        cfg, ctx, dev, model = self.cfg, self.ctx, self.device, self.model
        t0 = time.perf_counter()
        lr = lr_at(self.step_count, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        loss_sum, base_sum, pos1_a, pos1_b = 0.0, 0.0, 0.0, 0.0
        for micro in range(cfg.grad_accum):
            ids, positions = self.loader.next_batch(), None
            if ctx is not None:  # points drawn for the global batch, then this rank's rows of both
                positions = ctx.shard(self.objective.sample(ids.shape[0], ids.shape[1]))
                ids = ctx.shard(ids)
            ids = ids.to(dev)
            with grad_sync(model, ctx, micro == cfg.grad_accum - 1) if ctx else contextlib.nullcontext():
                with autocast(dev, self.amp):
                    res = model(ids, positions)
                (res.loss / cfg.grad_accum).backward()
            loss_sum += res.loss.item() / cfg.grad_accum
            base_sum += res.ce_base.mean().item() / cfg.grad_accum
            pos1_a += res.ce_aug[..., 0].mean().item() / cfg.grad_accum
            pos1_b += res.ce_base[..., 0].mean().item() / cfg.grad_accum
        if ctx is not None:  # equal targets per rank: the global mean is the mean of the ranks' means
            loss_sum, base_sum, pos1_a, pos1_b = (v / self.world for v in ctx.all_sum([loss_sum, base_sum, pos1_a,
                                                                                        pos1_b]))
        gnorm = grad_norm(self.params, cfg.clip)
        check_step_finite(self.step_count + 1, loss_sum, gnorm, self.last_saved)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        row = {"step": self.step_count, "loss": loss_sum, "baseline": base_sum, "pos1": pos1_a,
               "pos1_baseline": pos1_b, "lr": lr, "grad_norm": gnorm, "seconds": time.perf_counter() - t0}
        self.history.append(row)
        return row

    def fit(self, *, progress: bool = True) -> TrainResult:
        """Train to ``cfg.steps`` (at most ``stop_after`` more steps), evaluating every ``eval_every`` and
        saving every ``save_every`` steps and at the end; returns the run's :class:`TrainResult`."""
        cfg, ctx = self.cfg, self.ctx
        end = cfg.steps if cfg.stop_after is None else min(cfg.steps, self.step_count + cfg.stop_after)
        bar = None
        if progress and end > self.step_count and (ctx is None or ctx.is_main):
            from tqdm import tqdm

            bar = tqdm(total=end - self.step_count, desc="train", dynamic_ncols=True, file=sys.stderr)
        ckpt = None
        tok_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
        self.coprocessor.train()
        try:
            while self.step_count < end:
                row = self.step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", base=f"{row['baseline']:.3f}",
                                    p1=f"{row['pos1']:.2f}/{row['pos1_baseline']:.2f}",
                                    tok_s=f"{tok_per_step / row['seconds']:.0f}")
                if cfg.eval_every and self.step_count % cfg.eval_every == 0:
                    self.evaluate()
                if (cfg.save_every and self.step_count % cfg.save_every == 0) or self.step_count == end:
                    ckpt = self.save()
        finally:
            if bar is not None:
                bar.close()
        if ckpt is None and self.step_count > 0 and not (self.ckpt_path / (MARKER if ctx else "state.json")).exists():
            ckpt = self.save()
        if ctx is not None:  # the single-directory format eval / generate / demo read
            if ctx.is_main and ckpt is not None:
                self.log(f"exported {export_dist_checkpoint(self.ckpt_path, self.out / 'coprocessor')} "
                         f"(from {self.ckpt_path})")
            ctx.barrier()
            shutdown(ctx)
        return TrainResult(self.coprocessor, self.objective, self.history, self.evals,
                           ckpt or (self.ckpt_path if self.ckpt_path.exists() else None),
                           time.perf_counter() - self.t_start)


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
    trainer = Trainer(cfg, resume=resume, decoder=decoder, corpus=corpus, tokenizer=tokenizer, log=log)
    return trainer.fit(progress=progress)

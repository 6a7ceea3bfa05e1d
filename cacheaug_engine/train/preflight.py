"""Checks of a training run's settings, before any model is loaded or any step is taken.

Every bad value gets one ValueError that names the setting (config key and ``--flag``) and
what was expected. Generic checks (types, devices, paths, numbers) live in ``checks``; this
module holds what only training needs: the ranges of a TrainConfig, the inputs of a run, and
which settings a ``--resume`` may change.

Resume policy (``RESUME_MAY_CHANGE``): the run length and cadence (steps, stop_after,
eval_every, eval_seqs, save_every), where and how it runs (out, device, threads,
grad_checkpoint, precision, compile) and the optimizer's hyper-parameters (lr, min_lr_ratio, warmup,
weight_decay, clip, soft_lr_mult: the schedule continues from the resumed step with the new
values) may change. Everything else (coprocessor shape and init, data, tokenizer, model,
sequence layout, seed, held-out split) fixes tensor shapes or the data stream; a difference
is refused with every differing key and both values, so state.json never records settings
that the saved tensors do not have. ``init_from`` is ignored on resume (the checkpoint's
own weights are continued).
"""

from __future__ import annotations

import os
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from cacheaug_engine.checks import check_data_files, check_device, check_field_types, flag, probe_writable_dir
from cacheaug_engine.device import PRECISIONS

RESUME_MAY_CHANGE = frozenset(
    {
        "steps", "stop_after", "eval_every", "eval_seqs", "save_every", "out", "device", "threads",
        "grad_checkpoint", "precision", "compile", "init_from", "lr", "min_lr_ratio", "warmup", "weight_decay", "clip",
        "soft_lr_mult",
        "distributed", "dist_timeout",  # ddp <-> fsdp share the checkpoint format; batch_size: see train()
    }
)


MAX_LR = 1e6


def _at_least(cfg: Any, name: str, low: float, *, optional: bool = False) -> None:
    v = getattr(cfg, name)
    if optional and v is None:
        return
    if not v >= low:
        raise ValueError(f"{flag(name)}: expected >= {low}{' (or unset)' if optional else ''}, got {v!r}")


def _positive(cfg: Any, name: str, *, optional: bool = False) -> None:
    v = getattr(cfg, name)
    if optional and v is None:
        return
    if not v > 0:
        raise ValueError(f"{flag(name)}: expected a number > 0{' (or unset)' if optional else ''}, got {v!r}")


def check_train_config(cfg: Any) -> None:
    """Types, finiteness and the ranges of a TrainConfig that its own ``validate`` leaves out."""
    check_field_types(cfg)
    for name in ("seq_len", "batch_size", "grad_accum", "steps", "num_latents", "ahead", "positions", "eval_seqs"):
        _at_least(cfg, name, 1)
    for name in ("warmup", "eval_every", "save_every", "lora_rank", "seed"):
        _at_least(cfg, name, 0)
    _at_least(cfg, "stop_after", 0, optional=True)  # 0: build/resume the coprocessor, take no step
    for name in ("threads", "max_chars"):
        _at_least(cfg, name, 1, optional=True)
    for name in ("lr", "soft_lr_mult", "first_weight"):
        _positive(cfg, name)
    if cfg.lr * cfg.soft_lr_mult > MAX_LR or cfg.lr > MAX_LR:  # AdamW's fp32 step size overflows near 1e38
        raise ValueError(
            f"{flag('lr')}: expected lr and lr * soft_lr_mult <= {MAX_LR:g}, got lr={cfg.lr!r}, "
            f"soft_lr_mult={cfg.soft_lr_mult!r}"
        )
    for name in ("lora_alpha", "scale_init"):
        _positive(cfg, name, optional=True)
    for name in ("weight_decay", "clip", "contrast", "contrast_margin"):
        if hasattr(cfg, name):
            _at_least(cfg, name, 0)
    if not 0 <= cfg.heldout_frac < 1:
        raise ValueError(f"{flag('heldout_frac')}: expected a fraction in [0, 1), got {cfg.heldout_frac!r}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError(f"{flag('min_lr_ratio')}: expected a fraction in [0, 1], got {cfg.min_lr_ratio!r}")
    _at_least(cfg, "min_prefix", 1)
    if cfg.positions + cfg.ahead + cfg.min_prefix >= cfg.seq_len + 2:
        raise ValueError(
            f"{flag('seq_len')}: seq_len {cfg.seq_len} too short for {cfg.positions} positions with "
            f"ahead={cfg.ahead} and min_prefix={cfg.min_prefix} (needs seq_len >= positions + ahead + min_prefix - 1)"
        )
    if cfg.distributed not in (None, "ddp", "fsdp"):
        raise ValueError(f"{flag('distributed')}: expected ddp or fsdp, got {cfg.distributed!r}")
    _positive(cfg, "dist_timeout")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"{flag('precision')}: expected one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    check_device(cfg.device, flag("device"))


def check_run_inputs(cfg: Any) -> Path:
    """What a run reads and writes, checked before the model is loaded: the data files exist and
    are files, ``out`` is a writable directory (returned)."""
    if cfg.data:
        check_data_files(cfg.data, flag("data"))
    if cfg.compile and cfg.decoder_impl == "transformers":
        raise ValueError(f"{flag('compile')}: compiles the native decoder's regions; {flag('decoder_impl')} "
                         "transformers has none (use --decoder-impl native or drop --compile)")
    return probe_writable_dir(cfg.out, flag("out"))


def resume_differences(saved: dict[str, Any], cfg: Any) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) for every setting that may not change on resume."""
    now = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    defaults = {f.name: f.default for f in fields(cfg) if f.default is not MISSING}
    out = []
    for key in sorted(set(now) | set(saved)):
        if key in RESUME_MAY_CHANGE:
            continue
        # a key the checkpoint predates counts as its default value
        a, b = saved.get(key, defaults.get(key, "<unset>")), now.get(key, "<unset>")
        if a != b:
            out.append((key, a, b))
    return out


def check_resume(saved: dict[str, Any], cfg: Any, source: str | os.PathLike) -> None:
    """Refuse a resume whose settings differ from the checkpoint's in anything outside
    ``RESUME_MAY_CHANGE``; the message lists each differing key with both values."""
    diffs = resume_differences(saved, cfg)
    if diffs:
        items = "; ".join(f"{flag(k)}: checkpoint {a!r}, now {b!r}" for k, a, b in diffs)
        raise ValueError(
            f"--resume: {source} was trained with other settings ({items}); pass the checkpoint's values "
            f"or start a new run in another --out (only {', '.join(sorted(RESUME_MAY_CHANGE))} may change)"
        )


def check_resume_step(step: Any, steps: int, source: str | os.PathLike) -> None:
    """A resumed run must not already be past ``--steps`` (it would report steps it never took)."""
    if isinstance(step, int) and not isinstance(step, bool) and step > steps:
        raise ValueError(
            f"--resume: {source} is at step {step}, past steps (--steps) {steps}; pass --steps > {step} to train "
            "further (or start a new run in another --out)"
        )


def other_hint(other: Path) -> str:
    """How to resume from the other kind of checkpoint found in OUT: ``checkpoint-dist`` (sharded,
    written under torchrun with --distributed) or a plain ``checkpoint``."""
    if other.name == "checkpoint-dist":
        return (
            f"{other} exists (a distributed checkpoint): resume it under torchrun with --distributed ddp or fsdp "
            f"and --resume, or export it (cacheaug export {other} DST) and start a run with --init-from DST"
        )
    return f"{other} exists (a single-process checkpoint): resume it without --distributed (plain cacheaug train)"


def eval_ahead_range(seq_len: int) -> tuple[int, int]:
    """Valid N_A for evaluating sequences of ``seq_len`` tokens: at least 8 context tokens before a point."""
    return 1, max(seq_len - 8, 1)

"""Command-line pieces the subcommands share: ``UsageError`` and TrainConfig <-> argparse.

cli.py (train, demo) and demo.py both use these; keeping them here means neither of those
imports the other.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from .train_config import TrainConfig


class UsageError(Exception):
    """A bad command-line value (reported as one line, exit code 2)."""


def _bool_flag(p: argparse.ArgumentParser, name: str, help: str) -> None:
    p.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help)


def add_train_flags(p: argparse.ArgumentParser, *, demo: bool = False) -> None:
    """Flags mirroring TrainConfig (default None = take the config file's / built-in value)."""
    p.add_argument("--config", metavar="JSON", help="JSON file with TrainConfig keys (flags override it)")
    p.add_argument("--model", help='"default" (SmolLM2-135M), a HF dir or .gguf, or "random:<config.json>"')
    p.add_argument("--tokenizer", help='tokenizer path or "bytes" (default: the model\'s own)')
    p.add_argument("--data", nargs="+", metavar="FILE", help="text or .jsonl files (default: Python's docs)")
    p.add_argument("--out", help="output directory (checkpoint in OUT/checkpoint)")
    for name, typ, hlp in [
        ("--seq-len", int, "tokens per packed sequence"),
        ("--batch-size", int, "sequences per micro-batch"),
        ("--grad-accum", int, "micro-batches per optimizer step"),
        ("--steps", int, "optimizer steps"),
        ("--lr", float, "peak learning rate"),
        ("--soft-lr-mult", float, "learning-rate multiplier of soft tokens and latent scale"),
        ("--min-lr-ratio", float, "final lr / peak lr of the cosine schedule"),
        ("--warmup", int, "linear warmup steps"),
        ("--weight-decay", float, "AdamW weight decay (adapters / weights only)"),
        ("--clip", float, "gradient-norm clip (0 = off)"),
        ("--num-latents", int, "N_L, latents per augmentation point"),
        ("--ahead", int, "N_A, target tokens scored after each point"),
        ("--positions", int, "augmentation points per sequence per step"),
        ("--min-prefix", int, "smallest augmentation point (context tokens before the latents)"),
        ("--lora-rank", int, "LoRA rank (0 = full fine-tune of a copy)"),
        ("--lora-alpha", float, "LoRA alpha (default = rank)"),
        ("--scale-init", float, "initial latent scale (default: embedding RMS / hidden RMS)"),
        ("--heldout-frac", float, "fraction of documents held out"),
        ("--max-chars", int, "use at most this many characters of training text"),
        ("--eval-every", int, "held-out eval every N steps (0 = off)"),
        ("--eval-seqs", int, "held-out sequences per eval"),
        ("--save-every", int, "checkpoint every N steps (always at the end)"),
        ("--seed", int, "random seed"),
        ("--threads", int, "torch CPU threads"),
        ("--stop-after", int, "stop this run after N steps (the schedule still spans --steps)"),
    ]:
        p.add_argument(name, type=typ, help=hlp)
    p.add_argument("--placement", choices=["paper", "early"], help="latents after the prefix, or one token earlier")
    p.add_argument("--scale-mode", choices=["none", "fixed", "learned"], help="latent output scale")
    p.add_argument("--soft-init", choices=["stats", "tokens"], help="soft-token initialisation")
    p.add_argument("--init-from", metavar="CKPT", help="start from this coprocessor checkpoint")
    p.add_argument("--device", help='"auto", "cpu" or "cuda"')
    _bool_flag(p, "--grad-checkpoint", "recompute activations in backward")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def train_config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> TrainConfig:
    """TrainConfig from built-ins < ``base`` < --config file < explicit flags."""
    values: dict[str, Any] = dict(base or {})
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"--config: no such file: {path}")
        try:
            loaded = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UsageError(f"--config: {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"--config: {path} must hold a JSON object")
        values.update(loaded)
    for f in fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    try:
        cfg = TrainConfig.from_dict(values)
        cfg.validate()
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    return cfg

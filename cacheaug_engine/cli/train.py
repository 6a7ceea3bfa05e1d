"""``cacheaug train``: train (or resume) a coprocessor as a TrainConfig says."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cacheaug_engine.cli.args import add_train_flags, train_config_from_args


def add_parser(sub: Any) -> None:
    """Register ``train`` on the subcommand parsers ``sub``."""
    t = sub.add_parser("train", help="train a coprocessor", description="Train a coprocessor (see --help).")
    add_train_flags(t)
    t.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoint")
    t.set_defaults(func=run)



def run(args: argparse.Namespace) -> int:
    """Run ``cacheaug train``; returns the exit code."""
    from cacheaug_engine.train.distributed import describe_failure, env_rank, is_collective_failure
    from cacheaug_engine.train.trainer import train

    cfg = train_config_from_args(args)
    try:
        res = train(cfg, resume=args.resume, progress=not args.no_progress)
    except RuntimeError as e:  # a dead / hung peer: one clear line, exit 1 (no hang, no traceback wall)
        if not (cfg.distributed and is_collective_failure(e)):
            raise
        sys.stderr.write(f"cacheaug: error: {describe_failure(e, cfg.dist_timeout)}\n")
        return 1
    if env_rank() != 0:  # only rank 0 reports
        return 0
    last = res.history[-1] if res.history else {}
    print(
        f"done: {len(res.history)} steps, last loss {last.get('loss', float('nan')):.4f} "
        f"(decoder alone {last.get('baseline', float('nan')):.4f}); checkpoint: {res.checkpoint}"
    )
    return 0

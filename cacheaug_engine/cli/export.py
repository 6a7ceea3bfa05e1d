"""``cacheaug export``: a training checkpoint -> the slim coprocessor directory eval / generate read."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cacheaug_engine.cli.args import UsageError


def add_parser(sub: Any) -> None:
    """Register ``export`` on the subcommand parsers ``sub``."""
    x = sub.add_parser(
        "export",
        help="checkpoint -> slim coprocessor directory",
        description="Write a training checkpoint (OUT/checkpoint, or a sharded OUT/checkpoint-dist from "
        "--distributed) as the coprocessor directory that eval, generate and demo read (no optimizer).",
    )
    x.add_argument("src", metavar="CKPT", help="checkpoint directory (plain or distributed)")
    x.add_argument("dst", metavar="DST", help="directory to write")
    x.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="tensor dtype written")
    x.set_defaults(func=run)



def run(args: argparse.Namespace) -> int:
    """Run ``cacheaug export CKPT DST``; returns the exit code."""
    import torch

    from cacheaug_engine.train.checkpoint import export_coprocessor
    from cacheaug_engine.train.dist_checkpoint import MARKER, export_dist_checkpoint

    src = Path(args.src)
    if not src.exists():
        raise UsageError(f"CKPT: no such checkpoint directory: {src}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    sharded = (src / MARKER).exists() or (src / ".metadata").exists()
    export = export_dist_checkpoint if sharded else export_coprocessor
    out = export(src, args.dst, dtype=dtype)
    print(f"exported {src} -> {out}")
    return 0

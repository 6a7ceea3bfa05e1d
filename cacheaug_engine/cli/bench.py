"""``cacheaug bench``: the benchmark suite (bench/, installed as cacheaug_engine.bench)."""

from __future__ import annotations

import argparse
from typing import Any

from cacheaug_engine.cli.args import UsageError


def _bench_module():
    """The benchmark suite's CLI (installed as cacheaug_engine.bench), or None in a build without it."""
    try:
        from cacheaug_engine.bench import cli as bench_cli
    except ImportError:
        return None
    return bench_cli


def add_parser(sub: Any) -> None:
    """Register ``bench`` on the subcommand parsers ``sub``."""
    mod = _bench_module()
    p = sub.add_parser("bench", help="microbenchmarks and end-to-end benchmarks", description="Benchmarks.")
    if mod is not None and hasattr(mod, "add_arguments"):
        mod.add_arguments(p)
    p.set_defaults(func=run, bench_module=mod)


def run(args: argparse.Namespace) -> int:
    """Run ``cacheaug bench``; returns the exit code."""
    mod = args.bench_module
    if mod is None or not hasattr(mod, "run"):
        raise UsageError("the benchmark suite (cacheaug_engine.bench.cli) is not installed in this build")
    return int(mod.run(args) or 0)



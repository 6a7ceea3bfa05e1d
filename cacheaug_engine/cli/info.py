"""``cacheaug info``: versions, backends and what each backend's kernels run on this machine."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    """Register ``info`` on the subcommand parsers ``sub``."""
    i = sub.add_parser("info", help="versions and kernel backends", description="Print versions and backends.")
    i.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``cacheaug info``; returns the exit code."""
    import platform

    import torch

    import cacheaug_engine

    print(f"cacheaug-engine {cacheaug_engine.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}", end="")
    try:
        import triton

        print(f", triton {triton.__version__}")
    except Exception:  # noqa: BLE001 - triton is optional
        print(", triton: not installed")
    cuda = torch.cuda.is_available()
    print(f"cuda: {torch.cuda.get_device_name(0) if cuda else 'no device'}")
    print("backends:")
    for name, info in cacheaug_engine.backends().items():
        print(f"  {name}: {info}")
    from cacheaug_engine.ops.frozen_linear import availability

    print(f"  linear (frozen projections): {availability()}")
    from cacheaug_engine.ops.capabilities import format_matrix

    print("capabilities (what each backend's kernels run; availability above):")
    print("  " + format_matrix().replace("\n", "\n  "))
    try:
        from cacheaug_engine.models import default_model_path

        print(f"default model: {default_model_path()}")
    except FileNotFoundError as e:
        print(f"default model: unavailable ({e})")
    return 0

"""``cacheaug tasks``: write a synthetic task's documents as JSONL (see ``data.tasks``)."""

from __future__ import annotations

import argparse
from typing import Any

from cacheaug_engine.data.tasks import TASKS


def add_parser(sub: Any) -> None:
    """Register ``tasks`` on the subcommand parsers ``sub``."""
    p = sub.add_parser("tasks", help="write a synthetic reasoning task as JSONL",
                       description="Write a synthetic task's documents (one JSON object per line) for --data.")
    p.add_argument("task", choices=TASKS)
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--docs", type=int, default=2000, help="documents to write")
    p.add_argument("--per-doc", type=int, default=12, help="problems per document")
    p.add_argument("--digits", type=int, default=3, help="operand digits")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``cacheaug tasks``; returns the exit code."""
    from cacheaug_engine.checks import check_int
    from cacheaug_engine.data.tasks import write_task

    for name in ("docs", "per_doc", "digits"):
        check_int(getattr(args, name), f"--{name.replace('_', '-')}", 1)
    path = write_task(args.out, args.task, docs=args.docs, per_doc=args.per_doc, digits=args.digits, seed=args.seed)
    print(f"wrote {args.docs} documents of {args.per_doc} {args.task} problems to {path}")
    return 0

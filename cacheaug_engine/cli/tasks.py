"""``cacheaug tasks``: write a task's documents as JSONL.

* ``addition`` (``data.tasks``): training text for ``cacheaug train --data`` (one document of
  ``--per-doc`` problems per line, ``{"text": ...}``).
* ``gsm-symbolic`` / ``arithmetic`` (``data.reasoning``, the lm-eval tasks' documents): ``--split
  train|test`` writes the documents as lm-eval sees them (question, answer, solution, choices, gold);
  ``--as-text`` writes them as training text instead (``{"text": "Question: ...\\nAnswer: <solution>"}``
  or ``a+b=c`` lines), so a coprocessor can be trained on the train templates only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cacheaug_engine.data.tasks import TASKS

REASONING = ("gsm-symbolic", "arithmetic")


def add_parser(sub: Any) -> None:
    """Register ``tasks`` on the subcommand parsers ``sub``."""
    p = sub.add_parser("tasks", help="write a synthetic reasoning task as JSONL",
                       description="Write a task's documents (one JSON object per line): training text for --data, "
                                   "or the documents of the shipped lm-eval tasks (cacheaug lm-eval).")
    p.add_argument("task", choices=(*TASKS, *REASONING))
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--docs", type=int, help="documents to write (default: addition 2000, train 500, test 200)")
    p.add_argument("--per-doc", type=int, default=12, help="problems per document (addition; arithmetic --as-text)")
    p.add_argument("--digits", type=int, default=3, help="operand digits")
    p.add_argument("--split", choices=("train", "test"), default="train", help="gsm-symbolic / arithmetic split")
    p.add_argument("--as-text", action="store_true", help="training text ({'text': ...}) instead of documents")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def reasoning_records(task: str, split: str, docs: int, *, digits: int = 3, per_doc: int = 12, seed: int = 0,
                      as_text: bool = False) -> list[dict[str, Any]]:
    """The JSONL records ``cacheaug tasks`` writes for a reasoning task (documents, or training text)."""
    from cacheaug_engine.data.reasoning import arithmetic_docs, gsm_symbolic_docs

    if task == "gsm-symbolic":
        rows = gsm_symbolic_docs(split, docs, seed)
        if as_text:
            return [{"text": f"Question: {d['question']}\nAnswer: {d['solution']}"} for d in rows]
        return rows
    n = docs * per_doc if as_text else docs
    rows = arithmetic_docs(split, n, digits, seed)
    if as_text:
        lines = [f"{d['question']}{d['answer']}" for d in rows]
        return [{"text": "\n".join(lines[i : i + per_doc])} for i in range(0, n, per_doc)]
    return rows


def run(args: argparse.Namespace) -> int:
    """Run ``cacheaug tasks``; returns the exit code."""
    from cacheaug_engine.checks import check_int, check_output_file
    from cacheaug_engine.data.reasoning import DEFAULT_DOCS
    from cacheaug_engine.data.tasks import write_task
    from cacheaug_engine.fileio import atomic_write

    docs = args.docs if args.docs is not None else (2000 if args.task in TASKS else DEFAULT_DOCS[args.split])
    check_int(docs, "--docs", 1)
    for name in ("per_doc", "digits"):
        check_int(getattr(args, name), f"--{name.replace('_', '-')}", 1)
    if args.task in TASKS:
        path = write_task(args.out, args.task, docs=docs, per_doc=args.per_doc, digits=args.digits, seed=args.seed)
        print(f"wrote {docs} documents of {args.per_doc} {args.task} problems to {path}")
        return 0
    check_int(args.digits, "--digits", 1, 18)
    out = check_output_file(args.out, "--out")
    records = reasoning_records(args.task, args.split, docs, digits=args.digits, per_doc=args.per_doc,
                                seed=args.seed, as_text=args.as_text)
    atomic_write(out, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records), "utf-8"))
    kind = "training texts" if args.as_text else "documents"
    print(f"wrote {len(records)} {args.task} {kind} ({args.split} split) to {out}")
    return 0

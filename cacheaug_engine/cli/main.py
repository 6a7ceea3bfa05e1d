"""The ``cacheaug`` command line: one module per command in this package; ``main`` parses and dispatches.

Every subcommand takes ``--help``; train/demo accept ``--config FILE.json`` (keys of
:class:`cacheaug_engine.train.config.TrainConfig`), with flags given on the command line winning.
Their flags are derived from TrainConfig's fields (cli/args.py add_train_flags): one per field.
Bad paths and values end with one ``cacheaug: error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from cacheaug_engine.cli import (
    bench,
    demo,
    evaluate,
    export,
    export_hf,
    generate,
    info,
    kernels,
    lm_eval,
    serve,
    task_eval,
    tasks,
    train,
)
from cacheaug_engine.cli.args import UsageError

# --help lists them in this order
COMMANDS = (demo, train, evaluate, task_eval, generate, export, export_hf, serve, info, bench, kernels, tasks,
            lm_eval)


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line on stderr (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
    """Our own warnings (a prompt past the model's trained positions, ...) as one ``cacheaug: warning:`` line."""
    from cacheaug_engine.models.config import PositionRangeWarning

    if issubclass(category, PositionRangeWarning):
        sys.stderr.write(f"cacheaug: warning: {message}\n")
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser: one subcommand per module of this package."""
    p = _Parser(prog="cacheaug", description="Differentiable cache augmentation on a frozen decoder.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cacheaug`` script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from cacheaug_engine.train.checkpoint import CheckpointError
    from cacheaug_engine.train.numerics import NonFiniteLossError

    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return int(args.func(args) or 0)
    except UsageError as e:
        sys.stderr.write(f"cacheaug: error: {e}\n")
        return 2
    except NonFiniteLossError as e:  # the run diverged: not a usage error, but still one line
        sys.stderr.write(f"cacheaug: error: {e}\n")
        return 1
    except (CheckpointError, ValueError) as e:
        sys.stderr.write(f"cacheaug: error: {e}\n")
        return 2
    except OSError as e:  # missing files, a full disk, permissions: say which file and why
        msg = f"{e.filename}: {e.strerror}" if e.strerror and e.filename else str(e)
        sys.stderr.write(f"cacheaug: error: {msg}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("cacheaug: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``cacheaug`` command line: demo, train, eval, generate, export, info, bench, kernels.

Every subcommand takes ``--help``; train/demo accept ``--config FILE.json`` (keys of
:class:`cacheaug_engine.train_config.TrainConfig`), with flags given on the command line winning.
Their flags are derived from TrainConfig's fields (cli_args.add_train_flags): one per field.
Bad paths and values end with one ``cacheaug: error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .cli_args import UsageError, add_train_flags, train_config_from_args


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line on stderr (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


# -- subcommands -----------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    """cacheaug train."""
    from .distributed import describe_failure, env_rank, is_collective_failure
    from .train import train

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


def cmd_eval(args: argparse.Namespace) -> int:
    """cacheaug eval CKPT [CKPT ...]."""
    from .evaluate import run_eval_cli

    return run_eval_cli(args)


def cmd_generate(args: argparse.Namespace) -> int:
    """cacheaug generate."""
    from .demo import run_generate_cli

    return run_generate_cli(args)


def cmd_demo(args: argparse.Namespace) -> int:
    """cacheaug demo."""
    from .demo import run_demo

    return run_demo(args)


def cmd_export(args: argparse.Namespace) -> int:
    """cacheaug export CKPT DST."""
    import torch

    from .checkpoint import export_coprocessor
    from .dist_checkpoint import MARKER, export_dist_checkpoint

    src = Path(args.src)
    if not src.exists():
        raise UsageError(f"CKPT: no such checkpoint directory: {src}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    sharded = (src / MARKER).exists() or (src / ".metadata").exists()
    export = export_dist_checkpoint if sharded else export_coprocessor
    out = export(src, args.dst, dtype=dtype)
    print(f"exported {src} -> {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """cacheaug info: versions and backend availability."""
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
    from .ops.frozen_linear import availability

    print(f"  linear (frozen projections): {availability()}")
    from .capabilities import format_matrix

    print("capabilities (what each backend's kernels run; availability above):")
    print("  " + format_matrix().replace("\n", "\n  "))
    try:
        from .models import default_model_path

        print(f"default model: {default_model_path()}")
    except FileNotFoundError as e:
        print(f"default model: unavailable ({e})")
    return 0


def _bench_module():
    import importlib

    for name in ("cacheaug_engine.bench.cli", "bench.cli"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _add_bench(sub: Any) -> None:
    mod = _bench_module()
    p = sub.add_parser("bench", help="microbenchmarks and end-to-end benchmarks", description="Benchmarks.")
    if mod is not None and hasattr(mod, "add_arguments"):
        mod.add_arguments(p)
    p.set_defaults(func=_cmd_bench, bench_module=mod)


def _cmd_bench(args: argparse.Namespace) -> int:
    mod = args.bench_module
    if mod is None or not hasattr(mod, "run"):
        raise UsageError("the benchmark suite (cacheaug_engine.bench.cli) is not installed in this build")
    return int(mod.run(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    p = _Parser(prog="cacheaug", description="Differentiable cache augmentation on a frozen decoder.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    d = sub.add_parser(
        "demo",
        help="train, evaluate and compare on SmolLM2-135M + Python's docs",
        description="Fine-tune (or train) a coprocessor on the default model and text, evaluate held-out "
        "per-position perplexity with and without latents, show one generation, write OUT/report.json, "
        "OUT/ppl.png and OUT/checkpoint.",
    )
    add_train_flags(d)
    d.add_argument("--from-scratch", action="store_true", help="ignore the shipped coprocessor")
    d.add_argument("--prompt", help="prompt for the generation example (default: held-out text)")
    d.add_argument("--max-new-tokens", type=int, default=24, help="tokens generated in the example")
    d.add_argument("--eval-ahead", type=int, default=8, help="positions scored after each point in the eval")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a coprocessor", description="Train a coprocessor (see --help).")
    add_train_flags(t)
    t.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoint")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "eval", help="held-out per-position perplexity", description="Evaluate checkpoints on held-out text."
    )
    e.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint directories (several: a sweep)")
    e.add_argument("--model", help="decoder (default: the one the checkpoint was trained on)")
    e.add_argument("--tokenizer", help="tokenizer path or 'bytes'")
    e.add_argument("--data", nargs="+", metavar="FILE", help="text / .jsonl files (default: as in training)")
    e.add_argument("--seq-len", type=int, help="sequence length (default: as in training)")
    e.add_argument("--ahead", type=int, help="N_A positions scored (default: as in training)")
    e.add_argument("--pause", metavar="CKPT", help="a pause-table checkpoint (--latents pause) to compare against")
    e.add_argument("--eval-seqs", type=int, default=64, help="held-out sequences to score")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--device", default="auto")
    e.add_argument("--out", default="runs/eval", help="writes OUT/eval.json and OUT/ppl.png")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="augmented vs plain generation", description="Generate text.")
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--checkpoint", metavar="CKPT", help="coprocessor checkpoint (default: the shipped one)")
    g.add_argument("--model", help="decoder (default: the checkpoint's)")
    g.add_argument("--tokenizer", help="tokenizer path or 'bytes'")
    g.add_argument("--no-augment", action="store_true", help="the decoder alone")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--num-samples", type=int, default=1, help="continuations sharing one prompt cache")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--save-latents", metavar="FILE", help="store the prompt's latents (safetensors)")
    g.add_argument("--latents", metavar="FILE", help="reuse latents saved with --save-latents")
    g.add_argument("--device", default="auto")
    g.set_defaults(func=cmd_generate)

    x = sub.add_parser(
        "export",
        help="checkpoint -> slim coprocessor directory",
        description="Write a training checkpoint (OUT/checkpoint, or a sharded OUT/checkpoint-dist from "
        "--distributed) as the coprocessor directory that eval, generate and demo read (no optimizer).",
    )
    x.add_argument("src", metavar="CKPT", help="checkpoint directory (plain or distributed)")
    x.add_argument("dst", metavar="DST", help="directory to write")
    x.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="tensor dtype written")
    x.set_defaults(func=cmd_export)

    i = sub.add_parser("info", help="versions and kernel backends", description="Print versions and backends.")
    i.set_defaults(func=cmd_info)
    _add_bench(sub)
    from . import kernels_cli  # stdlib-only at import; compiles happen in worker processes

    k = sub.add_parser("kernels", help="list Triton kernels; --compile: build them for sm_80/sm_90, no GPU needed",
                       description="List or ahead-of-time compile the Triton kernels (see kernels_cli).")
    kernels_cli.add_arguments(k)
    k.set_defaults(func=kernels_cli.run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cacheaug`` script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .checkpoint import CheckpointError
    from .numerics import NonFiniteLossError

    try:
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

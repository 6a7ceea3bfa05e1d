"""The ``cacheaug`` command line: demo, train, eval, generate, info, bench.

Every subcommand takes ``--help``; train/eval/demo accept ``--config FILE.json`` (keys of
:class:`cacheaug_engine.train.TrainConfig`), with flags given on the command line winning.
Bad paths and values end with one ``cacheaug: error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn


class UsageError(Exception):
    """A bad command-line value (reported as one line, exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line on stderr (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _bool_flag(p: argparse.ArgumentParser, name: str, help: str) -> None:
    p.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help)


def _add_train_flags(p: argparse.ArgumentParser, *, demo: bool = False) -> None:
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


def _train_config(args: argparse.Namespace, base: dict[str, Any] | None = None):
    """TrainConfig from built-ins < ``base`` < --config file < explicit flags."""
    from .train import TrainConfig

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


# -- subcommands -----------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    """cacheaug train."""
    from .train import train

    cfg = _train_config(args)
    if args.resume and not (Path(cfg.out) / "checkpoint").exists():
        raise UsageError(f"--resume: no checkpoint in {cfg.out}/checkpoint")
    res = train(cfg, resume=args.resume, progress=not args.no_progress)
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
    _add_train_flags(d, demo=True)
    d.add_argument("--from-scratch", action="store_true", help="ignore the shipped coprocessor")
    d.add_argument("--prompt", help="prompt for the generation example (default: held-out text)")
    d.add_argument("--max-new-tokens", type=int, default=24, help="tokens generated in the example")
    d.add_argument("--eval-ahead", type=int, default=8, help="positions scored after each point in the eval")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a coprocessor", description="Train a coprocessor (see --help).")
    _add_train_flags(t)
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

    i = sub.add_parser("info", help="versions and kernel backends", description="Print versions and backends.")
    i.set_defaults(func=cmd_info)
    _add_bench(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cacheaug`` script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .checkpoint import CheckpointError

    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        sys.stderr.write(f"cacheaug: error: {e}\n")
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, CheckpointError, ValueError) as e:
        sys.stderr.write(f"cacheaug: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("cacheaug: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

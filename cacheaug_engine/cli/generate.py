"""``cacheaug generate``: augmented (or plain) continuation of a prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cacheaug_engine.augment.shipped import shipped_coprocessor


def add_parser(sub: Any) -> None:
    """Register ``generate`` on the subcommand parsers ``sub``."""
    g = sub.add_parser("generate", help="augmented vs plain generation", description="Generate text.")
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--checkpoint", metavar="CKPT", help="coprocessor checkpoint (default: the shipped one)")
    g.add_argument("--model", help="decoder (default: the checkpoint's)")
    g.add_argument("--decoder-impl", choices=("auto", "native", "transformers"),
                   help="decoder implementation for --model (default: as in training)")
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
    g.set_defaults(func=run)



def run(args: Any) -> int:
    """``cacheaug generate``: augmented (or plain) continuation of --prompt."""
    from cacheaug_engine.checks import check_int, check_number, probe_writable_dir
    from cacheaug_engine.cli.args import UsageError
    from cacheaug_engine.data.text import decode, encode, eos_id, load_tok
    from cacheaug_engine.device import pick_device
    from cacheaug_engine.generation import augment, generate, load_latents, save_latents
    from cacheaug_engine.models.loaders import load_model
    from cacheaug_engine.train.checkpoint import (
        coprocessor_config_of,
        coprocessor_from_checkpoint,
        load_checkpoint,
        train_config_of,
    )
    from cacheaug_engine.train.config import TrainConfig

    # every value checked before a checkpoint or model is read
    check_int(args.max_new_tokens, "--max-new-tokens", 1)
    check_int(args.num_samples, "--num-samples", 1)
    check_number(args.temperature, "--temperature (0 = greedy)", 0.0)
    check_int(args.top_k, "--top-k (0 = off)", 0)
    if not args.prompt.strip():
        raise UsageError("--prompt: expected non-empty text, got an empty string")
    if args.latents is not None and not Path(args.latents).is_file():
        raise FileNotFoundError(f"--latents: {args.latents}: no such file (expected a file from --save-latents)")
    if args.save_latents is not None:
        probe_writable_dir(Path(args.save_latents).parent, "--save-latents")
    dev = pick_device(args.device)
    ck = None
    need_cop = not args.no_augment and args.latents is None
    ck_path = args.checkpoint or (str(shipped_coprocessor()) if shipped_coprocessor() else None)
    if ck_path is not None and (need_cop or args.model is None):
        ck = load_checkpoint(ck_path, with_optimizer=False)
    if need_cop and ck is None:
        raise UsageError("no coprocessor: pass --checkpoint (this build ships none) or --no-augment")
    tc = train_config_of(ck) if ck is not None else TrainConfig()
    if ck is not None and need_cop:
        coprocessor_config_of(ck)
    model_spec = args.model or tc.model
    decoder = load_model(model_spec, dev, impl=args.decoder_impl or tc.decoder_impl)
    tok = load_tok(args.tokenizer or tc.tokenizer, model_spec)
    ids = encode(tok, args.prompt)
    if not ids:
        raise UsageError("--prompt is empty")
    prompt = torch.tensor([ids], dtype=torch.long, device=dev)
    handle = None
    if args.latents:
        handle = load_latents(args.latents, dev)
    elif need_cop:
        cop = coprocessor_from_checkpoint(decoder, ck, device=dev, tokenizer=tok)
        cop.eval()
        handle = augment(decoder, cop, prompt, capacity=len(ids) + cop.num_latents + args.max_new_tokens + 1)
        if args.save_latents:
            path = save_latents(args.save_latents, handle, {"checkpoint": str(ck.path), "model": model_spec})
            print(f"saved latents to {path}")
    if args.no_augment:
        handle = None
    g = generate(
        decoder,
        prompt,
        latents=handle,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        num_samples=args.num_samples,
        eos_id=eos_id(tok),
    )
    mode = "augmented" if g.augmented else "plain"
    for i, toks in enumerate(g.tokens):
        tag = f"[{mode}{' ' + str(i) if len(g.tokens) > 1 else ''}]"
        print(f"{tag} {args.prompt}{decode(tok, toks)}")
    return 0

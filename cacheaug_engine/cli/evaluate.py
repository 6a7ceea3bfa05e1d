"""``cacheaug eval CKPT [CKPT ...]``: held-out per-position perplexity of checkpoints against the
decoder alone and the controls, one table each on the same held-out sequences (eval.evaluator)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cacheaug_engine.augment.objective import CacheAugmentationObjective
from cacheaug_engine.fileio import write_json


def add_parser(sub: Any) -> None:
    """Register ``eval`` on the subcommand parsers ``sub``."""
    e = sub.add_parser(
        "eval", help="held-out per-position perplexity", description="Evaluate checkpoints on held-out text."
    )
    e.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint directories (several: a sweep)")
    e.add_argument("--model", help="decoder (default: the one the checkpoint was trained on)")
    e.add_argument("--decoder-impl", choices=("auto", "native", "transformers"),
                   help="decoder implementation for --model (default: as in training)")
    e.add_argument("--tokenizer", help="tokenizer path or 'bytes'")
    e.add_argument("--data", nargs="+", metavar="FILE", help="text / .jsonl files (default: as in training)")
    e.add_argument("--seq-len", type=int, help="sequence length (default: as in training)")
    e.add_argument("--ahead", type=int, help="N_A positions scored (default: as in training)")
    e.add_argument("--pause", metavar="CKPT", help="a pause-table checkpoint (--latents pause) to compare against")
    e.add_argument("--eval-seqs", type=int, default=64, help="held-out sequences to score")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--device", default="auto")
    e.add_argument("--out", default="runs/eval", help="writes OUT/eval.json and OUT/ppl.png")
    e.set_defaults(func=run)



def _check_seq_len(value: Any, ahead: int | None, configs: list[Any]) -> int:
    """--seq-len must hold a context token and the N_A targets scored after each point: N_A + 1 with the
    checkpoints' N_A (when --ahead is not given), else 2."""
    low, why = 2, "one context token and one target"
    if ahead is None:
        na = max(c.ahead for c in configs)
        low, why = na + 1, f"one context token and the N_A = {na} targets the checkpoint scores; --ahead scores fewer"
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(
            f"--seq-len: expected an integer >= {low} ({why}; trained with --seq-len {configs[0].seq_len}), "
            f"got {value!r}"
        )
    return value


def run(args: Any) -> int:
    """``cacheaug eval CKPT ...``: one table per checkpoint on the same held-out sequences."""
    from cacheaug_engine.checks import check_data_files, check_int, probe_writable_dir
    from cacheaug_engine.data.corpus import load_corpus
    from cacheaug_engine.data.text import load_tok
    from cacheaug_engine.device import autocast_dtype, pick_device
    from cacheaug_engine.eval.evaluator import run_controls, summary
    from cacheaug_engine.eval.plots import plot_controls
    from cacheaug_engine.eval.tables import format_controls
    from cacheaug_engine.models.loaders import load_model
    from cacheaug_engine.train.checkpoint import (
        coprocessor_config_of,
        coprocessor_from_checkpoint,
        load_checkpoint,
        train_config_of,
    )

    # everything is checked before the decoder is loaded (checkpoints are small: read them first)
    check_int(args.eval_seqs, "--eval-seqs", 1)
    check_int(args.batch_size, "--batch-size", 1)
    ckpts = [load_checkpoint(p, with_optimizer=False) for p in args.checkpoints]
    pause_ck = load_checkpoint(args.pause, with_optimizer=False) if getattr(args, "pause", None) else None
    if pause_ck is not None and pause_ck.coprocessor_config.get("latents") != "pause":
        raise ValueError(f"--pause: {args.pause} is not a pause-table checkpoint (train it with --latents pause)")
    configs = [train_config_of(ck) for ck in ckpts]
    for ck in ckpts:
        coprocessor_config_of(ck)
    first = configs[0]
    model_spec = args.model or first.model
    seq_len = first.seq_len if args.seq_len is None else _check_seq_len(args.seq_len, args.ahead, configs)
    data = args.data or first.data
    if data:
        check_data_files(data, "--data" if args.data else f"data of {ckpts[0].path} (pass --data)")
    aheads = []
    for ck, cfg in zip(ckpts, configs, strict=True):
        what = "--ahead" if args.ahead is not None else f"ahead of {ck.path} (pass --ahead)"
        aheads.append(check_int(cfg.ahead if args.ahead is None else args.ahead, what, 1, seq_len - 1))
    out = probe_writable_dir(args.out, "--out")
    dev = pick_device(args.device)
    # the held-out split needs only the tokenizer: an empty one is reported before the model loads
    tok = load_tok(args.tokenizer or first.tokenizer, model_spec)
    corpus = load_corpus(tok, seq_len, files=data or None, heldout_frac=first.heldout_frac)
    held = corpus.heldout[: args.eval_seqs]
    if held.shape[0] == 0:
        raise ValueError(
            f"held-out split is empty: {' '.join(data) if data else 'the default corpus'} gives "
            f"{corpus.num_docs[1]} held-out document(s) at heldout_frac {first.heldout_frac} and no held-out "
            f"sequence of {seq_len} tokens; expected at least one (pass --data with more text, or a shorter --seq-len)"
        )
    decoder = load_model(model_spec, dev, impl=args.decoder_impl or first.decoder_impl)
    print(f"held-out: {held.shape[0]} sequences of {seq_len} tokens")
    pause = coprocessor_from_checkpoint(decoder, pause_ck, device=dev, tokenizer=tok) if pause_ck is not None else None
    results = []
    for j, (ck, ahead) in enumerate(zip(ckpts, aheads, strict=True)):
        cop = coprocessor_from_checkpoint(decoder, ck, device=dev, tokenizer=tok)
        obj = CacheAugmentationObjective(decoder, cop, ahead=ahead)
        res, tab = run_controls(
            obj, held, corpus.train[:32], pause=pause, batch_size=args.batch_size, autocast_dtype=autocast_dtype(dev)
        )
        label = f"N_L={cop.num_latents} ({Path(ck.path).parent.name or ck.path})"
        print(format_controls(tab, f"{label}: step {ck.state.get('step')}, {res['seconds']:.1f}s"))
        png = plot_controls(tab, out / (f"ppl_{j}.png" if len(ckpts) > 1 else "ppl.png"), title=label)
        results.append(
            {
                "checkpoint": str(ck.path),
                "label": label,
                "step": ck.state.get("step"),
                "coprocessor": ck.coprocessor_config,
                "pause": str(pause_ck.path) if pause_ck is not None else None,
                "summary": summary(tab),
                "controls": tab,
                "per_sequence_ce": res["ce"],
                "plot": str(png),
            }
        )
    write_json(
        {"model": model_spec, "seq_len": seq_len, "heldout_sequences": int(held.shape[0]), "results": results},
        out / "eval.json",
    )
    print(f"wrote {out / 'eval.json'} and the plots in {out}")
    return 0

"""``cacheaug demo`` and ``cacheaug generate``.

The demo, on the default decoder (SmolLM2-135M) and the default text (Python's docs):

1. starts from the coprocessor shipped in ``cacheaug_engine/assets`` (trained by this
   package's own trainer on the *training* split; the command that made it is recorded
   beside it) or, with ``--from-scratch``, from a fresh one;
2. trains / fine-tunes it for a few steps on the training split, and the Pause Token control
   (the shipped pause table, trained on the coprocessor's budget, or a fresh one) for as many;
3. evaluates held-out per-position perplexity (positions 1..8 after augmentation points every
   8 tokens) on documents that neither the shipped models nor the fine-tuning saw, for the
   decoder alone, the pause control, the coprocessor, and the shuffled and mean controls
   (``report.run_controls``), with the coprocessor's paired change against each;
4. prints the table and one augmented vs plain generation, and writes OUT/report.json,
   OUT/ppl.png and OUT/checkpoint.

Nothing is hard-coded: every number in the report is measured in the run.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, replace
from typing import Any

import torch

from cacheaug_engine.augment.shipped import shipped_coprocessor, shipped_pause
from cacheaug_engine.cli.args import add_train_flags

MEAN_SAMPLE = 32  # training sequences whose points give the "mean" control's latent

# Demo defaults: (CPU, GPU). The coprocessor settings must match the shipped asset to use it.
DEMO_DEFAULTS: dict[str, Any] = dict(
    model="default",
    seq_len=128,
    batch_size=4,
    num_latents=4,
    ahead=8,
    positions=16,
    placement="early",
    lora_rank=32,
    scale_mode="learned",
    lr=1e-3,
    warmup=2,
    min_lr_ratio=0.1,
    eval_every=0,
    save_every=0,
    out="runs/demo",
)
# eval: all 184 held-out sequences of the default corpus, 5 scorings each (~6 of the demo's ~7 minutes on
# 2 cores): fewer leave the interval against the pause control too wide to tell (docs/recipe-search.md)
CPU_SCALE = dict(steps=10, eval_seqs=184)
GPU_SCALE = dict(steps=300, eval_seqs=1000, batch_size=16)
FINETUNE_LR = 2e-4






def add_parser(sub: Any) -> None:
    """Register ``demo`` on the subcommand parsers ``sub``."""
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
    d.add_argument("--task", choices=("addition",),
                   help="instead: the shipped task coprocessor on held-out problems of the task (answer perplexity "
                        "and exact match against the controls; cli/demo_task.py)")
    d.add_argument("--problems", type=int, default=48, help="held-out problems scored with --task")
    d.add_argument("--shots", type=int, default=4, help="solved lines before each problem with --task")
    d.set_defaults(func=run)



def run(args: Any) -> int:
    """Run the demo (see module docstring). Returns the exit code."""
    from cacheaug_engine.augment.objective import CacheAugmentationObjective
    from cacheaug_engine.checks import check_int
    from cacheaug_engine.cli.args import UsageError, train_config_from_args
    from cacheaug_engine.data.corpus import load_corpus
    from cacheaug_engine.data.text import decode, encode, eos_id, load_tok
    from cacheaug_engine.device import autocast_dtype, pick_device
    from cacheaug_engine.eval.evaluator import run_controls, summary
    from cacheaug_engine.eval.plots import plot_controls
    from cacheaug_engine.eval.tables import format_controls
    from cacheaug_engine.fileio import write_json
    from cacheaug_engine.generation import generate
    from cacheaug_engine.models.loaders import load_model
    from cacheaug_engine.train.checkpoint import load_checkpoint
    from cacheaug_engine.train.preflight import check_run_inputs, eval_ahead_range
    from cacheaug_engine.train.trainer import train

    if getattr(args, "task", None):
        from cacheaug_engine.cli.demo_task import run_task_demo

        return run_task_demo(args)
    t0 = time.perf_counter()
    dev = pick_device(args.device or "auto")
    base = dict(DEMO_DEFAULTS)
    base.update(GPU_SCALE if dev.type == "cuda" else CPU_SCALE)
    asset = None if args.from_scratch else shipped_coprocessor()
    if asset is not None and args.init_from is None:
        ck = load_checkpoint(asset, with_optimizer=False)
        cc = ck.coprocessor_config
        base.update(
            init_from=str(asset),
            num_latents=cc["num_latents"],
            placement=cc["placement"],
            lora_rank=cc["lora_rank"] or 0,
            lr=FINETUNE_LR,
            warmup=0,
        )
        tc = ck.state.get("train_config", {})
        # the held-out eval stays at the demo's seq_len (128) whatever length the asset was trained at
        base.update({k: tc[k] for k in ("ahead", "positions", "min_prefix") if k in tc})
    cfg = train_config_from_args(args, base)
    if cfg.distributed:  # the demo evaluates and generates in one process
        raise UsageError("--distributed: the demo runs in one process; use `torchrun ... train --distributed`")
    # every demo value is checked here, before the model is loaded and minutes are spent training
    out = check_run_inputs(cfg)
    lo, hi = eval_ahead_range(cfg.seq_len)
    eval_ahead = check_int(args.eval_ahead, f"--eval-ahead (for --seq-len {cfg.seq_len})", lo, hi)
    n_new = check_int(args.max_new_tokens, "--max-new-tokens", 1)
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("--prompt: expected non-empty text, got an empty string")
    print(f"cacheaug demo: device {dev}, out {out}")
    print("loading the decoder (SmolLM2-135M) and the text ..." if cfg.model == "default" else "loading ...")
    t = time.perf_counter()
    decoder = load_model(cfg.model, dev, impl=cfg.decoder_impl)
    tok = load_tok(cfg.tokenizer, cfg.model)
    corpus = load_corpus(
        tok, cfg.seq_len, files=cfg.data or None, heldout_frac=cfg.heldout_frac, max_chars=cfg.max_chars
    )
    t_load = time.perf_counter() - t
    print(f"data: {corpus.describe()} [{t_load:.1f}s]")
    if corpus.heldout.shape[0] == 0:
        raise UsageError("no held-out sequences: give more text or a larger --heldout-frac")
    if cfg.init_from:
        print(f"starting from the coprocessor at {cfg.init_from}")
    else:
        print("starting from a fresh coprocessor (initialised from the decoder's weights)")

    t = time.perf_counter()
    res = train(cfg, decoder=decoder, corpus=corpus, progress=not args.no_progress)
    # the Pause Token control gets the same steps, data and schedule (from the shipped pause table
    # when the coprocessor started from the shipped one)
    pause_from = shipped_pause() if cfg.init_from and cfg.init_from == str(asset) else None
    pcfg = replace(cfg, latents="pause", init_from=str(pause_from) if pause_from else None, out=str(out / "pause"))
    print(f"pause control: {'from ' + str(pause_from) if pause_from else 'a fresh table'}, {cfg.steps} steps")
    pres = train(pcfg, decoder=decoder, corpus=corpus, progress=not args.no_progress)
    t_train = time.perf_counter() - t

    held = corpus.heldout[: cfg.eval_seqs]
    print(f"evaluating on {held.shape[0]} held-out sequences (documents never trained on) ...")
    t = time.perf_counter()
    amp = autocast_dtype(dev)
    eval_obj = CacheAugmentationObjective(decoder, res.coprocessor, ahead=eval_ahead)
    ev, tab = run_controls(
        eval_obj, held, corpus.train[:MEAN_SAMPLE], pause=pres.coprocessor, batch_size=cfg.batch_size,
        autocast_dtype=amp,
    )
    t_eval = time.perf_counter() - t
    print(
        format_controls(
            tab,
            f"\nheld-out perplexity by position after the augmentation point (N_L={cfg.num_latents}; "
            f"decoder alone, pause control, coprocessor, shuffled and mean controls)",
        )
    )

    prompt_text = args.prompt
    if prompt_text is None:
        prompt_ids = held[0, :48].view(1, -1)
        prompt_text = decode(tok, prompt_ids[0].tolist())
    else:
        prompt_ids = torch.tensor([encode(tok, prompt_text)], dtype=torch.long)
        if prompt_ids.shape[1] == 0:
            raise UsageError("--prompt is empty")
    eos = eos_id(tok)
    t = time.perf_counter()
    plain = generate(decoder, prompt_ids, max_new_tokens=n_new, eos_id=eos)
    aug = generate(decoder, prompt_ids, coprocessor=res.coprocessor, max_new_tokens=n_new, eos_id=eos)
    t_gen = time.perf_counter() - t
    plain_text, aug_text = decode(tok, plain.tokens[0]), decode(tok, aug.tokens[0])
    print(f"\nprompt: {prompt_text!r}\n  plain:     {plain_text!r}\n  augmented: {aug_text!r}")

    plot_controls(
        tab,
        out / "ppl.png",
        title="SmolLM2-135M: coprocessor vs controls, held-out Python docs" if cfg.model == "default" else "",
    )
    timings = {"load": t_load, "train": t_train, "eval": t_eval, "generate": t_gen, "total": time.perf_counter() - t0}
    report = {
        "controls": tab,
        "summary": summary(tab),
        "settings": {
            **asdict(cfg),
            "coprocessor": res.coprocessor.config.to_dict(),
            "started_from": cfg.init_from or "fresh",
            "device": str(dev),
            "torch_threads": torch.get_num_threads(),
        },
        "heldout": {
            "sequences": int(held.shape[0]),
            "points_per_sequence": ev["points_per_sequence"],
            "documents": corpus.num_docs[1],
        },
        "training": {"steps": len(res.history), "history": res.history, "pause_history": pres.history},
        "generation": {"prompt": prompt_text, "plain": plain_text, "augmented": aug_text},
        "timings_s": timings,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": __import__("os").cpu_count(),
            "torch": torch.__version__,
        },
    }
    write_json(report, out / "report.json")
    print(
        f"\nwrote {out / 'report.json'}, {out / 'ppl.png'}, {res.checkpoint} "
        f"[load {t_load:.0f}s, train {t_train:.0f}s, eval {t_eval:.0f}s, total {timings['total']:.0f}s]"
    )
    return 0



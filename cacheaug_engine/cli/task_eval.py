"""``cacheaug task-eval CKPT --task addition``: held-out task problems (never trained on) scored against the
controls - the answer's per-position perplexity and greedy exact match (eval.task_eval)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

from cacheaug_engine.data.tasks import TASKS


def add_parser(sub: Any) -> None:
    """Register ``task-eval`` on the subcommand parsers ``sub``."""
    e = sub.add_parser(
        "task-eval", help="held-out task problems: answer perplexity and exact match against the controls",
        description="Score a coprocessor on held-out problems of a built-in task (none of their questions is in "
                    "the task's training documents): latents appended after each prompt, the answer scored "
                    "and decoded greedily, against the decoder alone, a pause table, shuffled and mean latents.",
    )
    e.add_argument("checkpoint", metavar="CKPT", help="coprocessor checkpoint directory")
    e.add_argument("--pause", metavar="CKPT", help="a pause-table checkpoint (--latents pause) to compare against")
    e.add_argument("--task", choices=TASKS, default="addition")
    e.add_argument("--digits", type=int, default=3, help="operand digits (as in the training documents)")
    e.add_argument("--problems", type=int, default=200, help="held-out problems to score")
    e.add_argument("--shots", type=int, default=8, help="solved lines before each question")
    e.add_argument("--seed", type=int, default=1, help="test-problem seed (the training documents use 0)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--device", default="auto")
    e.add_argument("--out", default="runs/task-eval", help="writes OUT/task_eval.json and OUT/task_eval.md")
    e.set_defaults(func=run)


def run(args: Any) -> int:
    """``cacheaug task-eval``: one table of methods on the same held-out problems."""
    from cacheaug_engine.checks import check_int, probe_writable_dir
    from cacheaug_engine.data.tasks import heldout_problems
    from cacheaug_engine.data.text import load_tok
    from cacheaug_engine.device import pick_device
    from cacheaug_engine.eval.task_eval import evaluate_task, format_task_table
    from cacheaug_engine.fileio import write_json
    from cacheaug_engine.models.loaders import load_model
    from cacheaug_engine.train.checkpoint import coprocessor_from_checkpoint, load_checkpoint, train_config_of

    check_int(args.problems, "--problems", 2)
    check_int(args.shots, "--shots", 0)
    check_int(args.digits, "--digits", 1, 18)
    check_int(args.batch_size, "--batch-size", 1)
    ck = load_checkpoint(args.checkpoint, with_optimizer=False)
    if ck.coprocessor_config.get("latents") == "pause":
        raise ValueError(f"CKPT: {args.checkpoint} is a pause table; pass a coprocessor checkpoint (and the pause "
                         "table with --pause)")
    pause_ck = load_checkpoint(args.pause, with_optimizer=False) if args.pause else None
    if pause_ck is not None and pause_ck.coprocessor_config.get("latents") != "pause":
        raise ValueError(f"--pause: {args.pause} is not a pause-table checkpoint (train it with --latents pause)")
    cfg = train_config_of(ck)
    problems = heldout_problems(args.task, args.problems, shots=args.shots, digits=args.digits, seed=args.seed)
    out = probe_writable_dir(args.out, "--out")
    dev = pick_device(args.device)
    decoder = load_model(cfg.model, dev, impl=cfg.decoder_impl)
    tok = load_tok(cfg.tokenizer, cfg.model)
    cop = coprocessor_from_checkpoint(decoder, ck, device=dev, tokenizer=tok)
    pause = coprocessor_from_checkpoint(decoder, pause_ck, device=dev, tokenizer=tok) if pause_ck else None
    t0 = time.perf_counter()
    res = evaluate_task(decoder, tok, problems, coprocessor=cop, pause=pause, batch_size=args.batch_size)
    title = (f"{args.task} ({args.digits} digits, {args.shots} shots), {len(problems)} held-out problems, "
             f"N_L {cop.num_latents}")
    table = format_task_table(res, title)
    print(table)
    res.update({
        "task": args.task, "digits": args.digits, "shots": args.shots, "seed": args.seed,
        "checkpoint": str(ck.path), "pause": str(pause_ck.path) if pause_ck else None,
        "num_latents": cop.num_latents, "train_config": json.loads(json.dumps(asdict(cfg), default=str)),
        "seconds": time.perf_counter() - t0,
    })
    write_json(res, out / "task_eval.json")
    (out / "task_eval.md").write_text(table, encoding="utf-8")
    print(f"wrote {out / 'task_eval.json'} ({res['seconds']:.0f} s)")
    return 0

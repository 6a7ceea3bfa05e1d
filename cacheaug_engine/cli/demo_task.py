"""``cacheaug demo --task addition``: the reasoning result of the shipped task coprocessor, measured now.

On the default decoder, the shipped pair for the task (``augment.shipped.shipped_task_pair``: the
coprocessor and the pause table trained on the same budget) is scored on held-out problems whose
questions never occur in the training documents (``data.tasks.heldout_problems``): latents appended
after each prompt, the answer scored teacher-forced (perplexity per answer token) and decoded
greedily (exact match), for the decoder alone, the pause table, the coprocessor, and latents from
another problem's cache (shuffled) and the coprocessor's mean latent. Writes OUT/task_report.json,
OUT/task_report.md and OUT/task.png; every number is measured in the run.
"""

from __future__ import annotations

import platform
import time
from typing import Any

import torch


def run_task_demo(args: Any) -> int:
    """Run the task demo; returns the exit code."""
    from cacheaug_engine.augment.shipped import shipped_task_pair
    from cacheaug_engine.checks import check_int, probe_writable_dir
    from cacheaug_engine.data.tasks import heldout_problems
    from cacheaug_engine.data.text import load_tok
    from cacheaug_engine.device import pick_device
    from cacheaug_engine.eval.plots import plot_task
    from cacheaug_engine.eval.task_eval import evaluate_task, format_task_table
    from cacheaug_engine.fileio import write_json
    from cacheaug_engine.models.loaders import load_model
    from cacheaug_engine.train.checkpoint import coprocessor_from_checkpoint, load_checkpoint, train_config_of

    t0 = time.perf_counter()
    check_int(args.problems, "--problems", 2)
    check_int(args.shots, "--shots", 0)
    cop_dir, pause_dir = shipped_task_pair(args.task)
    ck, pk = load_checkpoint(cop_dir, with_optimizer=False), load_checkpoint(pause_dir, with_optimizer=False)
    cfg = train_config_of(ck)
    digits = 3  # the shipped pair's training documents (COMMAND.md beside it)
    problems = heldout_problems(args.task, args.problems, shots=args.shots, digits=digits, seed=1)
    out = probe_writable_dir(getattr(args, "out", None) or "runs/demo-task", "--out")
    dev = pick_device(getattr(args, "device", None) or "auto")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    decoder = load_model(cfg.model, dev)
    tok = load_tok(cfg.tokenizer, cfg.model)
    cop = coprocessor_from_checkpoint(decoder, ck, device=dev, tokenizer=tok)
    pause = coprocessor_from_checkpoint(decoder, pk, device=dev, tokenizer=tok)
    print(f"{args.task}: {len(problems)} held-out problems ({digits} digits, {args.shots} solved lines before each; "
          f"no question of the training documents), shipped coprocessor N_L {cop.num_latents} "
          f"({cfg.steps} steps) and its pause table")
    res = evaluate_task(decoder, tok, problems, coprocessor=cop, pause=pause, batch_size=16)
    table = format_task_table(res, f"{args.task}: answer perplexity and exact match on held-out problems")
    print(table)
    for name in ("pause", "shuffled"):
        e = res["paired"][f"coprocessor vs {name}"]["exact_match"]
        print(f"exact match, coprocessor vs {name}: {100 * e['diff']:+.1f} points [{100 * e['lo']:+.1f}, "
              f"{100 * e['hi']:+.1f}] (coprocessor alone right on {e['a_only']}, {name} alone on {e['b_only']})")
    plot_task(res, out / "task.png", title=f"{args.task}: held-out answers, shipped coprocessor vs controls")
    res.update({"task": args.task, "digits": digits, "shots": args.shots, "checkpoint": str(cop_dir),
                "pause": str(pause_dir), "device": str(dev), "machine": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(), "seconds": time.perf_counter() - t0})
    write_json(res, out / "task_report.json")
    (out / "task_report.md").write_text(table, encoding="utf-8")
    print(f"wrote {out / 'task_report.json'}, task_report.md, task.png ({res['seconds']:.0f} s)")
    return 0

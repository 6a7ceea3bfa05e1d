"""``cacheaug lm-eval``: lm-evaluation-harness tasks for the decoder alone, the coprocessor and the controls
in one command, one table of scores and the coprocessor's paired differences with 95% intervals.

    cacheaug lm-eval --tasks cacheaug_arith3_ll,cacheaug_arith3_mc --limit 50 \\
        --coprocessor cacheaug_engine/assets/addition-coprocessor --pause cacheaug_engine/assets/addition-pause

Writes OUT/lm_eval.json (scores, differences, intervals, wall time per method and task), OUT/lm_eval.png,
and lm-eval's own files (aggregated results and per-document samples) under OUT/lm_eval/<method>/.
Needs the eval extra: ``pip install 'cacheaug-engine[eval]'``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

METHODS = ("none", "coprocessor", "pause", "shuffled", "mean")  # = generation.augmented_lm.METHODS
RESERVED = ("augment", "coprocessor", "pause", "batch_size", "device")
TASK_DIR = Path(__file__).resolve().parent.parent / "integrations" / "lm_eval_tasks"


def add_parser(sub: Any) -> None:
    """Register ``lm-eval`` on the subcommand parsers ``sub``."""
    p = sub.add_parser("lm-eval", help="lm-eval tasks: decoder vs coprocessor vs controls",
                       description="Run lm-evaluation-harness tasks for every method and compare them paired "
                                   "over documents. The shipped offline tasks (cacheaug_*) are always on the path.")
    p.add_argument("--tasks", required=True, help="comma-separated task (or tag) names, e.g. cacheaug_arith3_ll")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR", help="more task YAMLs (repeatable)")
    p.add_argument("--lm-eval-tasks", action="store_true",
                   help="also index lm-eval's built-in tasks (slow to index; most need a dataset download)")
    p.add_argument("--model-args", default="", help="extra model_args for every method, e.g. pretrained=DIR,dtype=bf16")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--coprocessor", metavar="CKPT", help="coprocessor checkpoint (default: the shipped one)")
    p.add_argument("--pause", metavar="CKPT", help="pause-table checkpoint (default: the shipped one)")
    p.add_argument("--limit", type=float, help="documents per task (an int), or a fraction < 1")
    p.add_argument("--num-fewshot", type=int, help="override the tasks' few-shot count")
    p.add_argument("--batch-size", type=int, default=8, help="distinct contexts per batch")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", default="runs/lm_eval", help="writes OUT/lm_eval.json, OUT/lm_eval.png, OUT/lm_eval/")
    p.set_defaults(func=run)


def _split(text: str, what: str) -> list[str]:
    from cacheaug_engine.cli.args import UsageError

    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"{what}: expected a comma-separated list, got {text!r}")
    return items


def _checkpoints(args: Any, methods: list[str]) -> dict[str, str | None]:
    """The coprocessor and pause checkpoints the methods need (shipped defaults named on stdout)."""
    from cacheaug_engine.augment.shipped import shipped_coprocessor, shipped_pause
    from cacheaug_engine.cli.args import UsageError
    from cacheaug_engine.train.checkpoint import coprocessor_config_of, load_checkpoint

    out: dict[str, str | None] = {"coprocessor": None, "pause": None}
    need = {"coprocessor": any(m in methods for m in ("coprocessor", "shuffled", "mean")), "pause": "pause" in methods}
    for key, default in (("coprocessor", shipped_coprocessor), ("pause", shipped_pause)):
        if not need[key]:
            continue
        path = getattr(args, key) or (str(default()) if default() else None)
        if path is None:
            raise UsageError(f"--{key}: no checkpoint given and this build ships none")
        if getattr(args, key) is None:
            print(f"--{key} {path} (shipped)")
        latents = coprocessor_config_of(load_checkpoint(path, with_optimizer=False)).latents
        if (latents == "pause") != (key == "pause"):
            raise UsageError(f"--{key}: {path} holds a {'pause table' if latents == 'pause' else 'coprocessor'}")
        out[key] = path
    return out


def run(args: Any) -> int:
    """``cacheaug lm-eval``: every method on every task, then the paired table."""
    from cacheaug_engine.checks import check_int, probe_writable_dir
    from cacheaug_engine.cli.args import UsageError

    tasks = _split(args.tasks, "--tasks")
    methods = _split(args.methods, "--methods")
    bad = [m for m in methods if m not in METHODS]
    if bad or len(set(methods)) != len(methods):
        raise UsageError(f"--methods: expected distinct names from {', '.join(METHODS)}, got {args.methods!r}")
    check_int(args.batch_size, "--batch-size", 1)
    if args.num_fewshot is not None:
        check_int(args.num_fewshot, "--num-fewshot", 0)
    limit: float | int | None = None
    if args.limit is not None:
        if not args.limit > 0 or (args.limit >= 1 and not float(args.limit).is_integer()):
            raise UsageError(f"--limit: expected an int >= 1 or a fraction in (0, 1), got {args.limit!r}")
        limit = int(args.limit) if args.limit >= 1 else float(args.limit)
    for d in args.include_path:
        if not Path(d).is_dir():
            raise FileNotFoundError(f"--include-path: {d}: no such directory")
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise UsageError(f"cacheaug lm-eval needs lm-eval ({e}): pip install 'cacheaug-engine[eval]'") from None
    from lm_eval.utils import simple_parse_args_string

    extra = simple_parse_args_string(args.model_args)
    taken = sorted(set(extra) & set(RESERVED))
    if taken:
        raise UsageError(f"--model-args: {', '.join(taken)} are set by cacheaug lm-eval's own flags")
    ckpts = _checkpoints(args, methods)
    out = probe_writable_dir(args.out, "--out")
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=[str(TASK_DIR), *args.include_path], include_defaults=args.lm_eval_tasks)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise UsageError(f"--tasks: unknown task(s) {', '.join(unknown)} (shipped: "
                         f"{', '.join(t for t in tm.all_tasks if t.startswith('cacheaug'))}; more with --include-path "
                         "or --lm-eval-tasks)")
    return _evaluate(args, tasks, methods, ckpts, extra, limit, tm, out)


def _evaluate(args: Any, tasks: list[str], methods: list[str], ckpts: dict[str, str | None], extra: dict[str, Any],
              limit: float | int | None, tm: Any, out: Path) -> int:
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    from cacheaug_engine.eval.harness_report import format_rows, paired_rows, per_document_scores, plot_rows
    from cacheaug_engine.fileio import write_json
    from cacheaug_engine.integrations.lm_eval import CacheAugLM

    base = None
    runs: dict[str, Any] = {}
    seconds: dict[str, dict[str, float]] = {}
    model_seconds: dict[str, dict[str, float]] = {}
    for method in methods:
        kw: dict[str, Any] = dict(extra, augment=method, batch_size=args.batch_size, device=args.device)
        if method == "pause":
            kw["pause"] = ckpts["pause"]
        elif method != "none":
            kw["coprocessor"] = ckpts["coprocessor"]
        if base is not None:  # one decoder (and tokenizer) for every method
            kw.update(pretrained=base.model.decoder, tokenizer=base.tok)
        lm = CacheAugLM(**kw)
        base = base or lm
        runs[method], seconds[method], model_seconds[method] = {}, {}, {}
        tracker = EvaluationTracker(output_path=str(out / "lm_eval" / method))
        for task in tasks:
            print(f"[{method}] {task} ...", flush=True)
            t0, m0 = time.perf_counter(), lm.seconds
            res = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tm, limit=limit,
                                          num_fewshot=args.num_fewshot, log_samples=True, bootstrap_iters=1000,
                                          evaluation_tracker=tracker)
            seconds[method][task] = time.perf_counter() - t0
            model_seconds[method][task] = lm.seconds - m0
            assert res is not None
            samples = res.pop("samples")
            tracker.save_results_aggregated(results=res, samples=samples)
            for name in res["configs"]:
                tracker.save_results_samples(task_name=name, samples=samples[name])
            runs[method].update(per_document_scores(res["results"], samples))
            print(f"[{method}] {task}: {seconds[method][task]:.1f}s ({model_seconds[method][task]:.1f}s in the model)",
                  flush=True)
    rows = paired_rows(runs, "coprocessor", seed=args.seed)
    print(format_rows(rows, methods))
    print("wall time per task, s (in the model): " + "; ".join(
        f"{t}: " + ", ".join(f"{m} {seconds[m][t]:.0f} ({model_seconds[m][t]:.0f})" for m in methods) for t in tasks))
    png = plot_rows(rows, out / "lm_eval.png")
    write_json({"tasks": tasks, "methods": methods, "checkpoints": ckpts, "model_args": args.model_args,
                "limit": limit, "rows": rows, "seconds": seconds,
                "model_seconds": model_seconds}, out / "lm_eval.json")
    print(f"wrote {out / 'lm_eval.json'}, {png} and lm-eval's files under {out / 'lm_eval'}")
    return 0

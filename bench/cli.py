"""`cacheaug bench ops|train|decode|all|plot` (also `python -m cacheaug_engine.bench`).

    cacheaug bench all --out bench/results/h100-2026-01-01.json      # one device call
    cacheaug bench ops --smoke --out /tmp/smoke.json                  # CPU, seconds
    cacheaug bench plot bench/results/*.json --plot-dir bench/results/plots

`cacheaug bench cpu` compares our decoder with transformers' on the CPU (bench/cpu_peer.py).
`cacheaug bench serve --model HF_DIR` serves augmented and plain requests through vLLM against our own
generate at batch 1, 8, 32 (bench/serve.py; run it from vLLM's own virtual environment).

Sections: ops = segment attention + decode_attention + cascade_decode + merge_states;
train = training step of the multi-position objective; decode = end-to-end decode
tokens/s and n-sample generation. `all` runs every section under one time budget
(default 540 s on CUDA, so it fits a 10-minute device call), giving each part a share
(SHARES); cases past a part's deadline are recorded as skipped, never silently dropped.
A budget also applies to single sections when --time-budget is given.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

SECTIONS = ("ops", "train", "decode")  # what `all` runs; `recipe` (the default training recipe) runs alone
# Share of the time budget of each part (deadlines are cumulative, so unused time rolls
# over to later parts). ops = segment + decode_attention + cascade + merge.
SHARES = {"segment": 0.33, "decode_attention": 0.10, "cascade": 0.09, "merge": 0.03, "train": 0.25,
          "decode_e2e": 0.20}
PARTS = {"ops": ("segment", "decode_attention", "cascade", "merge"), "train": ("train",),
         "decode": ("decode_e2e",), "recipe": ("recipe",)}
# With --budget-s the targets come first (bench/targets.py): more of the time to
# segment attention (its FlexAttention compiles dominate), less to end-to-end decoding.
BUDGET_SHARES = {"segment": 0.45, "decode_attention": 0.08, "cascade": 0.08, "merge": 0.02, "train": 0.25,
                 "decode_e2e": 0.12, "recipe": 1.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=[*SECTIONS, "all", "recipe", "plot", "cpu", "serve"],
                        help="which benchmarks to run (or plot; cpu = ours vs transformers on the CPU, paired; "
                             "recipe = training steps at the default recipe's shapes vs the naive loop and flex)")
    parser.add_argument("inputs", nargs="*", help="plot: result JSON files")
    parser.add_argument("--out", help="JSON file to write (run) / Markdown table file (plot)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, seconds (CI)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu (smoke: cpu)")
    parser.add_argument("--grid", choices=["quick", "sweep", "full"], default=None,
                        help="segment-attention shapes: quick = T sweep per model (default for all), "
                             "sweep = T, N, N_L one at a time (default for ops), full = cross product")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="default bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds for the whole run (default: 540 for all on CUDA, none otherwise)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for the whole run: picks shapes (the performance targets' shapes first, "
                             "bench/targets.py), peers and repeats to fit (bench/budget.py) and sets the "
                             "deadlines; CPU: smoke shapes")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per case (median)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls per case")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.add_argument("--plot-dir", default=None, help="plot: folder for PNGs (default: next to --out)")
    parser.add_argument("--model", default=None, help="serve: HF model directory (cacheaug export-hf writes one)")
    parser.add_argument("--coprocessor", default=None, help="serve: coprocessor checkpoint (default: the shipped one)")
    parser.add_argument("--batches", default="1,8,32", help="serve: batch sizes, comma-separated")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="serve: tokens generated per request")
    parser.add_argument("--threads", type=int, default=None,
                        help="serve: torch threads of our generate (default: 1 on the CPU, as vLLM's CPU worker)")


def _dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _prepare_torch() -> None:
    # One benchmark process compiles FlexAttention once per shape; the default recompile
    # limit (8) would make later shapes fall back to eager and measure the wrong thing.
    try:
        import torch._dynamo.config as dyn

        if hasattr(dyn, "recompile_limit"):
            dyn.recompile_limit = max(dyn.recompile_limit, 256)
        else:  # older torch
            dyn.cache_size_limit = max(dyn.cache_size_limit, 256)
    except Exception:  # noqa: BLE001 - not fatal: only affects compiled peers
        pass


def run_sections(args: argparse.Namespace) -> dict:
    """Run the sections ``args.what`` names; write (and return) the result document.

    The file is rewritten after every part, so a run killed from outside keeps what finished.
    """
    from . import e2e, ops_decode, ops_segment
    from .budget import plan_for_budget
    from .records import BenchContext, write_results

    smoke = bool(args.smoke)
    dev_name = args.device or ("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    device = torch.device(dev_name)
    dtype = _dtype(args.dtype, device)
    sections = list(SECTIONS) if args.what == "all" else [args.what]
    parts = [p for section in sections for p in PARTS[section]]
    plan = None
    if args.budget_s is not None:
        if args.time_budget is not None:
            raise ValueError("give --budget-s or --time-budget, not both")
        shares = {p: BUDGET_SHARES[p] for p in parts}
        plan = plan_for_budget(args.budget_s, "cpu" if smoke else device.type, tuple(sections), shares)
        smoke = smoke or plan.level == "smoke"
    budget = plan.budget_s if plan is not None else args.time_budget
    if budget is None and args.what == "all" and device.type == "cuda":
        budget = 540.0
    grid = args.grid or ("quick" if args.what == "all" else "sweep")
    _prepare_torch()
    repeats = args.repeats if args.repeats is not None or plan is None else plan.repeats
    warmup = args.warmup if args.warmup is not None or plan is None else plan.warmup
    ctx = BenchContext(device, smoke=smoke, repeats=repeats, warmup=warmup, time_budget_s=None,
                       progress=not args.no_progress)
    out = args.out or f"bench-{args.what}{'-smoke' if smoke else ''}.json"
    extra = {"config": {"what": args.what, "grid": "budget" if plan else grid,
                        "dtype": str(dtype).replace("torch.", ""),
                        "time_budget_s": budget, "repeats": ctx.timer.repeats, "warmup": ctx.timer.warmup,
                        "l2_flush_bytes": ctx.timer.flush_l2 and 256 * 2**20,
                        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
                        "plan": plan.summary() if plan else None,
                        "parts_done": []}}
    shares = plan.shares if plan is not None else SHARES
    total_share = sum(shares.get(p, SHARES.get(p, 1.0)) for p in parts)
    used_share = 0.0
    for part in parts:
        used_share += shares.get(part, SHARES.get(part, 1.0))
        if budget is not None:
            ctx.time_budget_s = budget * used_share / total_share  # deadline from the start of the run
        _run_part(part, ctx, dtype, smoke, grid, plan, e2e, ops_decode, ops_segment)
        extra["config"]["parts_done"].append(part)
        doc = write_results(out, ctx, sections, smoke=smoke, extra=extra)
    doc["_path"] = str(out)
    return doc


def _run_part(part: str, ctx, dtype: torch.dtype, smoke: bool, grid: str, plan, e2e, ops_decode,
              ops_segment) -> None:
    """One part of a run: the plan's shapes when a budget plan is given, else the grid's."""
    from . import shapes

    if part == "segment":
        if plan is not None:
            ops_segment.run_segment(ctx, plan.segment, dtype, peer_names=plan.segment_peers)
        else:
            ops_segment.run_segment(ctx, shapes.segment_shapes(grid, smoke), dtype)
    elif part == "decode_attention":
        ops_decode.run_decode(ctx, plan.decode if plan else shapes.decode_shapes(smoke), dtype)
    elif part == "cascade":
        ops_decode.run_cascade(ctx, plan.cascade if plan else shapes.cascade_shapes(smoke), dtype)
    elif part == "merge":
        ops_decode.run_merge(ctx, plan.merge if plan else shapes.merge_shapes(smoke), dtype)
    elif part == "train":
        if plan is not None:
            e2e.run_train(ctx, dtype, smoke=smoke, cases=plan.train, names=plan.train_names)
        else:
            e2e.run_train(ctx, dtype, smoke=smoke)
    elif part == "recipe":
        names = ("default", "flex", "peer:naive_loop") if plan is not None else e2e.TRAIN_NAMES
        e2e.run_train(ctx, dtype, smoke=smoke, cases=e2e.recipe_cases(smoke), names=names)
    elif part == "decode_e2e":
        e2e.run_generate(ctx, dtype, smoke=smoke, cases=plan.decode_e2e if plan else None)
    else:
        raise ValueError(f"unknown benchmark part {part!r}")


def _summary(doc: dict) -> str:
    recs = doc["records"]
    counts: dict[str, int] = {}
    for r in recs:
        key = r["status"].split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    parts = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    return f"{len(recs)} records ({parts}) on {doc['device']} in {doc['wall_s']} s -> {doc['_path']}"


def check_args(args: argparse.Namespace) -> None:
    """Every number and the device, checked before anything is built or timed (ValueError naming the flag:
    the CLI prints one line and exits 2)."""
    from cacheaug_engine.checks import check_device, check_int, check_number

    if args.repeats is not None:
        check_int(args.repeats, "--repeats", 1)
    if args.warmup is not None:
        check_int(args.warmup, "--warmup", 0)
    for flag_, value in (("--time-budget", args.time_budget), ("--budget-s", getattr(args, "budget_s", None))):
        if value is not None:
            check_number(value, f"{flag_} (seconds)", 0.0, strict=True)
    if args.device is not None:
        check_device(args.device, "--device")
        if args.device == "auto":  # check_device's spelling of the default
            args.device = None


def run(args: argparse.Namespace) -> int:
    check_args(args)
    if args.what == "plot":
        from .plot import render

        if not args.inputs:
            raise ValueError("bench plot: expected one or more result JSON files (from cacheaug bench ... --out)")
        out_md = args.out or str(Path(args.inputs[0]).with_suffix(".md"))
        plot_dir = args.plot_dir or str(Path(out_md).parent / "plots")
        written = render(args.inputs, plot_dir, out_md)
        for path in written:
            print(path)
        return 0
    if args.inputs:
        raise ValueError(f"bench {args.what}: unexpected arguments {args.inputs} (files are only for bench plot)")
    if args.what == "serve":
        return _run_serve(args)
    if args.what == "cpu":
        from .cpu_peer import run_cpu_peer

        out = args.out or f"bench-cpu{'-smoke' if args.smoke else ''}.json"
        doc = run_cpu_peer(out, smoke=bool(args.smoke), repeats=args.repeats, warmup=args.warmup)
        for c in doc["cases"]:
            print(f"{c['case']} T={c['T']} B={c['B']}: ours {c['ours_ms_median']} ms, "
                  f"transformers {c['transformers_ms_median']} ms, median paired ratio ours/transformers "
                  f"{c['ratio_median']} (95% {c['ratio_ci95']}); "
                  f"ours on torch's F.linear {c['ratio_torch_linear_median']}")
        print(f"-> {out}")
        return 0
    doc = run_sections(args)
    print(_summary(doc))
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    """`cacheaug bench serve`: arguments checked before vLLM or a model is loaded."""
    from cacheaug_engine.augment.shipped import shipped_coprocessor
    from cacheaug_engine.checks import check_int

    from .serve import run_serve_bench, table

    if not args.model or not (Path(args.model) / "config.json").is_file():
        raise ValueError(f"--model: bench serve needs a HF model directory (got {args.model!r}); "
                         "cacheaug export-hf default DIR writes SmolLM2-135M as one")
    cop = args.coprocessor or (str(shipped_coprocessor()) if shipped_coprocessor() else None)
    if cop is None or not Path(cop).exists():
        raise ValueError(f"--coprocessor: {cop}: no such checkpoint directory")
    try:
        batches = tuple(int(x) for x in args.batches.split(","))
    except ValueError:
        raise ValueError(f"--batches: expected comma-separated integers, got {args.batches!r}") from None
    for b in batches:
        check_int(b, "--batches", 1)
    check_int(args.max_new_tokens, "--max-new-tokens", 1)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", None: None}[args.dtype]
    out = args.out or f"bench/results/serve-{device}.json"
    doc = run_serve_bench(args.model, cop, out, batches=batches, max_new_tokens=args.max_new_tokens,
                          repeats=args.repeats or 2, device=device, dtype=dtype, progress=not args.no_progress,
                          threads=args.threads if args.threads is not None else (1 if device == "cpu" else None))
    print(table(doc))
    print(f"-> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cacheaug bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except (ValueError, OSError) as e:
        print(f"cacheaug bench: error: {e}", file=sys.stderr)
        return 2

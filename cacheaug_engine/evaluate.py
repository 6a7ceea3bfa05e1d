"""Held-out perplexity per position after the augmentation point, with and without latents.

``evaluate_objective`` scores fixed, evenly spaced augmentation points in every held-out
sequence (deterministic) and returns mean cross-entropy per position i = 1..N_A for the
augmented decoder and for the decoder alone on the same targets. ``report_table`` picks the
paper's positions (1, 2, 4, 8, 16, 32 as far as N_A allows, plus the mean) and gives
perplexities and the relative change in %.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .augment.layout import stride_positions
from .augment.objective import CacheAugmentationObjective
from .startup import autocast

REPORT_POSITIONS = (1, 2, 4, 8, 16, 32)


@torch.no_grad()
def evaluate_objective(
    objective: CacheAugmentationObjective,
    sequences: Tensor,
    *,
    batch_size: int = 4,
    stride: int | None = None,
    max_positions: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Mean CE per position over ``sequences`` [n, T] at fixed points p = stride, 2*stride, ...

    Points start after ``stride`` tokens of context (a point at p = 1 would put the latents at
    the very start of the sequence, where an LM's attention sink sits).

    Returns {"ahead", "ce_aug" [N_A], "ce_base" [N_A], "ce_diff_se" [N_A] (standard error of the
    paired per-target difference), "num_targets_per_position", "num_sequences", "seconds"}.
    The default stride spaces points N_A apart (about T / N_A points per sequence).
    """
    if sequences.shape[0] == 0:
        raise ValueError("no held-out sequences to evaluate (use more data or a larger held-out fraction)")
    was_training = objective.training
    objective.eval()
    na = objective.ahead
    t = sequences.shape[1]
    if stride is None:
        stride = na
    elif stride < 1:
        raise ValueError(f"stride: expected an integer >= 1 (or None for N_A), got {stride}")
    dev = next(objective.coprocessor.parameters()).device
    sum_aug = torch.zeros(na, dtype=torch.float64)
    sum_base = torch.zeros(na, dtype=torch.float64)
    sum_sq_diff = torch.zeros(na, dtype=torch.float64)
    count = 0
    t0 = time.perf_counter()
    for i in range(0, sequences.shape[0], batch_size):
        ids = sequences[i : i + batch_size].to(dev)
        pos = stride_positions(
            ids.shape[0], t, na, stride=stride, start=min(stride, t - na), max_positions=max_positions, device=dev
        )
        with autocast(dev, autocast_dtype):
            out = objective(ids, pos)
        sum_aug += out.ce_aug.double().flatten(0, 1).sum(0).cpu()
        sum_base += out.ce_base.double().flatten(0, 1).sum(0).cpu()
        sum_sq_diff += (out.ce_aug - out.ce_base).double().flatten(0, 1).pow(2).sum(0).cpu()
        count += out.ce_aug.shape[0] * out.ce_aug.shape[1]
        if progress is not None:
            progress(ids.shape[0])
    objective.train(was_training)
    mean_diff = (sum_aug - sum_base) / count
    var = (sum_sq_diff / count - mean_diff.pow(2)).clamp_min(0) * count / max(count - 1, 1)
    return {
        "ahead": na,
        "ce_aug": (sum_aug / count).tolist(),
        "ce_base": (sum_base / count).tolist(),
        "ce_diff_se": (var / count).sqrt().tolist(),  # standard error of the paired CE difference
        "num_targets_per_position": count,
        "num_sequences": int(sequences.shape[0]),
        "seconds": time.perf_counter() - t0,
    }


def report_table(result: dict[str, Any]) -> dict[str, Any]:
    """Per-position perplexities from :func:`evaluate_objective`'s output.

    Returns {"positions": [1, 2, 4, ..., "mean"], "baseline_ppl", "augmented_ppl",
    "relative_change_pct", "baseline_ce", "augmented_ce"} as aligned lists.
    """
    na = result["ahead"]
    ce_a, ce_b = result["ce_aug"], result["ce_base"]
    positions: list[Any] = [p for p in REPORT_POSITIONS if p <= na]
    rows_a = [ce_a[p - 1] for p in positions] + [sum(ce_a) / na]
    rows_b = [ce_b[p - 1] for p in positions] + [sum(ce_b) / na]
    se = result.get("ce_diff_se")
    positions.append("mean")
    ppl_a = [math.exp(x) for x in rows_a]
    ppl_b = [math.exp(x) for x in rows_b]
    return {
        "positions": positions,
        "baseline_ppl": ppl_b,
        "augmented_ppl": ppl_a,
        "relative_change_pct": [100.0 * (a / b - 1.0) for a, b in zip(ppl_a, ppl_b, strict=True)],
        "baseline_ce": rows_b,
        "augmented_ce": rows_a,
        "ce_diff_se": [se[p - 1] for p in positions if p != "mean"] + [None] if se else None,
    }


def format_table(table: dict[str, Any], title: str | None = None) -> str:
    """The table as aligned text (one row per position), like the paper's, with a 95% interval
    of the change from the paired per-target differences when available."""
    lines = [title] if title else []
    lines.append(f"{'position':>9} {'baseline ppl':>13} {'augmented ppl':>14} {'change':>9}   {'95% CI':>17}")
    se = table.get("ce_diff_se") or [None] * len(table["positions"])
    rows = zip(
        table["positions"],
        table["baseline_ppl"],
        table["augmented_ppl"],
        table["relative_change_pct"],
        table["baseline_ce"],
        table["augmented_ce"],
        se,
        strict=True,
    )
    for p, b, a, r, cb, ca, e in rows:
        ci = ""
        if e is not None:
            lo, hi = (100.0 * (math.exp(ca - cb + k * 1.96 * e) - 1.0) for k in (-1, 1))
            ci = f"[{lo:+.2f}%, {hi:+.2f}%]"
        lines.append(f"{p!s:>9} {b:>13.3f} {a:>14.3f} {r:>+8.2f}%   {ci:>17}")
    return "\n".join(lines)


def plot_tables(tables: dict[str, dict[str, Any]], path: str | os.PathLike, *, title: str = "") -> Path:
    """PNG of perplexity vs position: the baseline and one augmented curve per label (Agg backend)."""
    from .plotting import position_axes, save_position_plot

    fig, ax = position_axes()
    base_done = False
    for label, tab in tables.items():
        pos = [p for p in tab["positions"] if p != "mean"]
        n = len(pos)
        if not base_done:
            ax.plot(pos, tab["baseline_ppl"][:n], "k--o", label="decoder alone")
            base_done = True
        ax.plot(pos, tab["augmented_ppl"][:n], "-o", label=label)
    ax.set_xscale("log", base=2)
    return save_position_plot(fig, ax, path, title or "Cache augmentation: per-position perplexity")


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write JSON atomically (tmp file + fsync + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def run_eval_cli(args: Any) -> int:
    """``cacheaug eval CKPT ...``: one table per checkpoint on the same held-out sequences."""
    from .checkpoint import load_checkpoint
    from .data import load_corpus
    from .preflight import check_data_files, check_int, probe_writable_dir
    from .report import format_controls, plot_controls, run_controls, summary
    from .startup import (
        autocast_dtype,
        coprocessor_config_of,
        coprocessor_from_checkpoint,
        load_model,
        load_tok,
        pick_device,
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
    seq_len = first.seq_len if args.seq_len is None else check_int(args.seq_len, "--seq-len", 2)
    data = args.data or first.data
    if data:
        check_data_files(data, "--data" if args.data else f"data of {ckpts[0].path} (pass --data)")
    aheads = []
    for ck, cfg in zip(ckpts, configs, strict=True):
        what = "--ahead" if args.ahead is not None else f"ahead of {ck.path} (pass --ahead)"
        aheads.append(check_int(cfg.ahead if args.ahead is None else args.ahead, what, 1, seq_len - 1))
    out = probe_writable_dir(args.out, "--out")
    dev = pick_device(args.device)
    decoder = load_model(model_spec, dev)
    tok = load_tok(args.tokenizer or first.tokenizer, model_spec)
    corpus = load_corpus(tok, seq_len, files=data or None, heldout_frac=first.heldout_frac)
    held = corpus.heldout[: args.eval_seqs]
    print(f"held-out: {held.shape[0]} sequences of {seq_len} tokens")
    pause = coprocessor_from_checkpoint(decoder, pause_ck, device=dev) if pause_ck is not None else None
    results = []
    for j, (ck, ahead) in enumerate(zip(ckpts, aheads, strict=True)):
        cop = coprocessor_from_checkpoint(decoder, ck, device=dev)
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

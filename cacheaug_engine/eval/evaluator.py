"""Controlled held-out evaluation: coprocessor against the decoder alone and the controls.

``evaluate_controls`` scores the same targets (evenly spaced points in every held-out
sequence) with the decoder alone, the coprocessor's latents, and the controls of
``augment.controls`` (pause, shuffled, mean), sharing one prefill per batch. It keeps the
per-sequence mean CE per position of every method, so intervals are paired and use the
sequence as the unit (points of one sequence are not independent).

``controls_table`` turns that into per-position perplexities and the coprocessor's paired
change against each reference with a 95% interval; ``format_controls`` prints it and
``plot_controls`` draws it.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from cacheaug_engine.augment.controls import LatentStats, shuffled_latents
from cacheaug_engine.augment.layout import block_layout, stride_positions
from cacheaug_engine.augment.objective import CacheAugmentationObjective
from cacheaug_engine.eval.tables import METHODS, controls_table


def _batches(n: int, batch_size: int, min_rows: int) -> list[tuple[int, int]]:
    """[start, end) chunks of at most ``batch_size`` rows; a short last chunk is merged into the previous."""
    out = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if len(out) > 1 and out[-1][1] - out[-1][0] < min_rows:
        (a, _), (_, e) = out[-2], out[-1]
        out[-2:] = [(a, e)]
    return out


@torch.no_grad()
def evaluate_controls(
    objective: CacheAugmentationObjective,
    sequences: Tensor,
    *,
    pause: nn.Module | None = None,
    mean_table: nn.Module | None = None,
    shuffled: bool = True,
    batch_size: int = 4,
    stride: int | None = None,
    max_positions: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Per-sequence mean CE per position of every method on ``sequences`` [n, T].

    Args:
        objective: decoder + coprocessor (its ``ahead`` = positions scored).
        pause: a pause-table coprocessor (``latents="pause"``), or None to leave it out.
        mean_table: e.g. ``ConstantLatents(mean_latent(...))``, or None.
        shuffled: also score the coprocessor's latents rolled by one row of the batch.
        stride: points at stride, 2*stride, ... (default N_A).

    Returns {"ahead", "ce": {method: list [n][N_A]}, "methods", "cache_dependence",
    "num_sequences", "points_per_sequence", "seconds"}.
    """
    n, t = sequences.shape
    if n == 0:
        raise ValueError("no held-out sequences to evaluate (use more data or a larger held-out fraction)")
    if shuffled and n < 2:
        raise ValueError("the shuffled control needs at least 2 held-out sequences")
    was_training = objective.training
    objective.eval()
    na = objective.ahead
    stride = stride or na
    cop = objective.coprocessor
    dev = next(iter(cop.parameters())).device
    rows: dict[str, list[Tensor]] = {"decoder": [], "coprocessor": []}
    extra = {"pause": pause, "mean": mean_table}
    for name in ("pause", "shuffled", "mean"):
        if (name == "shuffled" and shuffled) or extra.get(name) is not None:
            rows[name] = []
    stats = LatentStats()
    npts = 0
    t0 = time.perf_counter()
    for a, e in _batches(n, batch_size, 2 if shuffled else 1):
        ids = sequences[a:e].to(dev)
        pos = stride_positions(
            ids.shape[0], t, na, stride=stride, start=min(stride, t - na), max_positions=max_positions, device=dev
        )
        npts = pos.shape[1]
        ctx = torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with ctx:
            lay = objective.layout(pos)
            cache, ce_base = objective.prefill(ids, lay)
            z = cop(cache, lay)
            stats.update(z)
            ces = {"decoder": ce_base, "coprocessor": objective.score(ids, cache, lay, z)}
            if shuffled:
                ces["shuffled"] = objective.score(ids, cache, lay, shuffled_latents(z))
            for name, src in extra.items():
                if src is not None:
                    lay_c = block_layout(pos, src.num_latents, na, src.placement)
                    ces[name] = objective.score(ids, cache, lay_c, src(cache, lay_c))
        for name, ce in ces.items():
            rows[name].append(ce.double().mean(1).cpu())  # [b, N_A]: per-sequence mean over its points
        if progress is not None:
            progress(ids.shape[0])
    objective.train(was_training)
    return {
        "ahead": na,
        "methods": [m for m in METHODS if m in rows],
        "ce": {k: torch.cat(v).tolist() for k, v in rows.items()},
        "cache_dependence": stats.ratio(),
        "num_sequences": n,
        "points_per_sequence": npts,
        "seconds": time.perf_counter() - t0,
    }












def run_controls(
    objective: CacheAugmentationObjective,
    heldout: Tensor,
    train_sample: Tensor,
    *,
    pause: nn.Module | None = None,
    batch_size: int = 4,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate ``objective``'s coprocessor and the controls on ``heldout``: the mean control is the
    coprocessor's mean latent over ``train_sample`` (training sequences). Returns (result, table).

    A pause table passed as the objective's own coprocessor is scored alone (no shuffled / mean:
    its latents never read a cache)."""
    from cacheaug_engine.augment.controls import ConstantLatents, mean_latent

    cop = objective.coprocessor
    is_pause = bool(getattr(cop, "is_pause", False))
    mean_table = None
    if not is_pause and train_sample.shape[0] > 0:
        table = mean_latent(
            cop, objective.decoder, train_sample, ahead=objective.ahead, batch_size=batch_size,
            autocast_dtype=autocast_dtype,
        )
        mean_table = ConstantLatents(table, cop.placement)
    res = evaluate_controls(
        objective,
        heldout,
        pause=pause,
        mean_table=mean_table,
        shuffled=not is_pause and heldout.shape[0] >= 2,
        batch_size=batch_size,
        autocast_dtype=autocast_dtype,
    )
    return res, controls_table(res)


def summary(table: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers: position 1 and the mean row, per method (ppl) and per reference
    (coprocessor's change in % with its 95% interval)."""
    out: dict[str, Any] = {}
    for i, key in ((0, "position1"), (-1, "mean")):
        out[key] = {
            "position": table["positions"][i],
            "ppl": {m: v[i] for m, v in table["ppl"].items()},
            "ce": {m: v[i] for m, v in table["ce"].items()},
            "change_pct": {r: list(v[i]) for r, v in table["change_pct"].items()},
        }
    out["cache_dependence"] = table["cache_dependence"]
    return out

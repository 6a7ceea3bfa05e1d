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
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from cacheaug_engine.augment.controls import ConstantLatents, LatentStats, shuffled_latents
from cacheaug_engine.augment.layout import layout_for, stride_positions
from cacheaug_engine.augment.objective import CacheAugmentationObjective
from cacheaug_engine.eval.tables import METHODS, controls_table


def _batches(n: int, batch_size: int, min_rows: int) -> list[tuple[int, int]]:
    """[start, end) chunks of at most ``batch_size`` rows; a short last chunk is merged into the previous."""
    out = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if len(out) > 1 and out[-1][1] - out[-1][0] < min_rows:
        (a, _), (_, e) = out[-2], out[-1]
        out[-2:] = [(a, e)]
    return out


def point_batches(
    sequences: Tensor, *, ahead: int, stride: int, batch_size: int, min_rows: int, device: torch.device,
    max_positions: int | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """The one evaluation loop's batches: (ids [b, T] on ``device``, points [b, N]) with points evenly
    spaced at stride, 2*stride, ... (deterministic) in every sequence of ``sequences`` [n, T]."""
    t = sequences.shape[1]
    for a, e in _batches(sequences.shape[0], batch_size, min_rows):
        ids = sequences[a:e].to(device)
        pos = stride_positions(
            ids.shape[0], t, ahead, stride=stride, start=min(stride, t - ahead), max_positions=max_positions,
            device=device,
        )
        yield ids, pos


@torch.no_grad()
def mean_latent(
    coprocessor: nn.Module,
    decoder: nn.Module,
    sequences: Tensor,
    *,
    ahead: int,
    stride: int | None = None,
    batch_size: int = 4,
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """The coprocessor's mean latent fp32 [N_L, d] over evenly spaced points of ``sequences``
    [n, T] (pass TRAINING sequences: the control must not see held-out text)."""
    if sequences.shape[0] == 0:
        raise ValueError("mean_latent needs at least one sequence")
    dev = next(iter(coprocessor.parameters())).device
    total, count = None, 0
    was_training = coprocessor.training
    coprocessor.eval()  # e.g. a centred coprocessor must not update its running mean here
    for ids, pos in point_batches(sequences, ahead=ahead, stride=stride or ahead, batch_size=batch_size, min_rows=1,
                                  device=dev):
        lay = layout_for(coprocessor, pos, ahead)
        ctx = torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with ctx:
            cache = decoder.prefill(ids, logits_at=ids.new_zeros(ids.shape[0], 0))[1]
            z = coprocessor(cache, lay).float()
        s = z.sum((0, 1)).double()
        total = s if total is None else total + s
        count += z.shape[0] * z.shape[1]
    coprocessor.train(was_training)
    return (total / count).float()


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
    n = sequences.shape[0]
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
    batches = point_batches(sequences, ahead=na, stride=stride, batch_size=batch_size, min_rows=2 if shuffled else 1,
                            device=dev, max_positions=max_positions)
    for ids, pos in batches:
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
                    lay_c = layout_for(src, pos, na)
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

    cop = objective.coprocessor
    is_pause = bool(getattr(cop, "is_pause", False))
    mean_table = None
    if not is_pause and train_sample.shape[0] > 0:
        table = mean_latent(
            cop, objective.decoder, train_sample, ahead=objective.ahead, batch_size=batch_size,
            autocast_dtype=autocast_dtype,
        )
        mean_table = ConstantLatents(table, cop.placement, cop.shift_tokens)
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

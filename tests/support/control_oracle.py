"""A plain-loop oracle for the objective and the controlled evaluation (issue 28).

Everything here is written from the contracts in the docstrings (augment/layout.py, augment/controls.py,
eval/evaluator.py), not from the code under test: one ordinary causal pass of the decoder per
augmentation point over [x[:start] ; latents ; x[start : p + N_A - 1]], the last N_A rows scoring
x[p : p + N_A], with the latents formed by hand:

* pause: the table times its per-slot scale (``exp(log_scale)``);
* coprocessor: the last hidden rows of one causal pass over [x[:start] ; soft tokens], times the scale
  (valid while the coprocessor's network equals the decoder, e.g. LoRA adapters at their zero init);
* shuffled: another row's coprocessor latents at the same point;
* mean: the mean of the coprocessor latents over the training points.

No layout tensors, no ``forward_blocks``, no ``score`` are used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def block_start(p: int, placement: str) -> int:
    """First row of point p's block = the prefix it sees: p ("paper") or p - 1 ("early")."""
    if placement not in ("paper", "early"):
        raise ValueError(f"placement: expected 'paper' or 'early', got {placement!r}")
    return p - 1 if placement == "early" else p


def eval_points(seq_len: int, ahead: int, stride: int | None = None) -> list[int]:
    """The evaluator's points: stride, 2*stride, ... while all N_A targets exist (stride = N_A)."""
    stride = stride or ahead
    return list(range(stride, seq_len - ahead + 1, stride))


def point_ce(dec, ids: Tensor, p: int, latents: Tensor, ahead: int, placement: str) -> Tensor:
    """CE [N_A] (float64, with grad through ``latents`` [N_L, d]) of x[p : p + N_A] for one sequence
    ``ids`` [T] given ``latents`` inserted at point p."""
    start = block_start(p, placement)
    row = ids.view(1, -1)
    seq = torch.cat(
        [dec.embed(row[:, :start]), latents.unsqueeze(0).to(dec.dtype), dec.embed(row[:, start : p + ahead - 1])], 1
    )
    logits = dec.prefill(inputs_embeds=seq)[0][0, -ahead:]
    return F.cross_entropy(logits.double(), ids[p : p + ahead], reduction="none")


@torch.no_grad()
def decoder_ce(dec, ids: Tensor, p: int, ahead: int) -> Tensor:
    """The decoder's own CE [N_A] of x[p : p + N_A] (full causal pass over ``ids`` [T])."""
    logits = dec.prefill(ids.view(1, -1))[0][0]
    return F.cross_entropy(logits[p - 1 : p + ahead - 1].double(), ids[p : p + ahead], reduction="none")


def pause_latents(soft_tokens: Tensor, log_scale: Tensor) -> Tensor:
    """The pause table times its scale: [N_L, d]."""
    return soft_tokens.double() * log_scale.double().exp().unsqueeze(-1)


def copro_latents(dec, soft_tokens: Tensor, log_scale: Tensor, ids: Tensor, p: int, placement: str) -> Tensor:
    """Coprocessor latents [N_L, d] at point p: the last N_L final-normed hidden rows of one causal pass
    over [x[:start] ; soft tokens], times the scale (the network = the decoder)."""
    start = block_start(p, placement)
    seq = torch.cat([dec.embed(ids.view(1, -1)[:, :start]), soft_tokens.unsqueeze(0).to(dec.dtype)], 1)
    hidden = dec.prefill(inputs_embeds=seq, return_hidden=True)[2][0, start:]
    return hidden.double() * log_scale.double().exp().unsqueeze(-1)


def per_sequence_mean(ces: list[Tensor]) -> Tensor:
    """Mean over a sequence's points of the per-point CE [N_A] -> [N_A]."""
    return torch.stack(ces).mean(0)

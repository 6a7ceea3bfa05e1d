"""Augmentation positions and the block layout of the multi-position pass (README.md, "What it computes").

For a sequence x[0:T] and augmentation points p_1 < ... < p_N, each point k owns one
block in the coprocessor pass (N_L soft-token rows) and one block in the augmented decoder
pass (N_L latent rows followed by token rows). Targets are x[p_k : p_k + N_A] ("position
i" = x[p_k + i - 1]), read from the last N_A rows of the decoder block.

Two placements:

* ``"paper"`` (default): block k sees the cache of x[:p_k]; latents sit at positions
  p_k .. p_k+N_L-1; the decoder block is [Z_k ; x[p_k : p_k+N_A-1]] (S = N_L + N_A - 1).
* ``"early"``: the latents go in one token earlier: block k sees x[:p_k - 1]; latents
  at p_k-1 .. p_k+N_L-2; the decoder block is [Z_k ; x[p_k-1 : p_k+N_A-1]]
  (S = N_L + N_A), so the token right before the first target is an ordinary token row.

Position ids (``shift_tokens``): by default (the paper) the token rows after the latents move N_L
positions on, so a RoPE gap of N_L opens between them and the prefix. With ``shift_tokens=False``
every token row keeps its own position (as in the decoder alone) and the latents take the N_L
positions before the block's first token row (clamped at 0), which the prefix's last tokens also
have: only relative positions matter to RoPE, and no gap opens (tools/position1_probe.py measures
what the gap costs at position 1).

Both use the same targets, so their numbers compare directly with each other and with the
decoder's own prediction (the prefill logit at row target - 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

PLACEMENTS = ("paper", "early")


def position_range(seq_len: int, ahead: int, min_prefix: int = 1) -> tuple[int, int]:
    """Inclusive range [lo, hi] of valid augmentation points p for a sequence of ``seq_len``.

    p >= max(1, min_prefix) (there is a token to condition on) and p + ahead <= seq_len
    (all N_A targets exist).
    """
    lo, hi = max(1, min_prefix), seq_len - ahead
    if hi < lo:
        raise ValueError(f"seq_len {seq_len} too short for ahead={ahead} with min_prefix={min_prefix}")
    return lo, hi


def sample_positions(
    batch: int,
    seq_len: int,
    num_positions: int,
    ahead: int,
    *,
    generator: torch.Generator | None = None,
    min_prefix: int = 1,
    device: torch.device | str = "cpu",
) -> Tensor:
    """N distinct random augmentation points per sequence, sorted: long [batch, N].

    Drawn uniformly without replacement from :func:`position_range`; reproducible with
    ``generator`` (CPU generator; the result is moved to ``device``).
    """
    lo, hi = position_range(seq_len, ahead, min_prefix)
    span = hi - lo + 1
    if num_positions > span:
        raise ValueError(f"num_positions {num_positions} > {span} valid positions (seq_len {seq_len}, ahead {ahead})")
    keys = torch.rand(batch, span, generator=generator)
    picks = keys.argsort(dim=1)[:, :num_positions].sort(dim=1).values + lo
    return picks.to(device)


def stride_positions(
    batch: int,
    seq_len: int,
    ahead: int,
    *,
    stride: int,
    start: int | None = None,
    min_prefix: int = 1,
    max_positions: int | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Evenly spaced points start, start+stride, ... up to the last valid one: long [batch, N]."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    lo, hi = position_range(seq_len, ahead, min_prefix)
    first = lo if start is None else start
    if not lo <= first <= hi:
        raise ValueError(f"start {first} outside the valid range [{lo}, {hi}]")
    pos = torch.arange(first, hi + 1, stride)
    if max_positions is not None:
        pos = pos[:max_positions]
    return pos.view(1, -1).expand(batch, -1).contiguous().to(device)


def check_positions(positions: Tensor, seq_len: int, ahead: int) -> Tensor:
    """Validate given points (long [B, N], strictly increasing per row) and return them as long."""
    if positions.dim() != 2:
        raise ValueError(f"positions must be [B, N], got shape {tuple(positions.shape)}")
    positions = positions.long()
    lo, hi = position_range(seq_len, ahead)
    if positions.numel():
        # one host read-back for both checks (each is a device sync on a GPU)
        increasing = (positions[:, 1:] > positions[:, :-1]).all().long()
        p_min, p_max, ok = torch.stack([positions.min(), positions.max(), increasing]).tolist()
        if p_min < lo or p_max > hi:
            raise ValueError(f"positions must lie in [{lo}, {hi}] for seq_len {seq_len}, ahead {ahead}")
        if not ok:
            raise ValueError("positions must be strictly increasing within each sequence")
    return positions


@dataclass
class BlockLayout:
    """Index tensors of the N-blocks-per-sequence pass (all long, on the positions' device).

    Attributes:
        positions: [B, N] augmentation points p_k (the first target is x[p_k]).
        prefix_lens: [B, N] cache entries each block sees (p_k, or p_k - 1 when "early").
        copro_pos: [B, N*N_L] position ids of the coprocessor's soft-token rows.
        dec_pos: [B, N*S] position ids of the augmented decoder rows (S = block_len).
        token_idx: [B, N, S - N_L] indices into x of the token rows of each decoder block.
        target_idx: [B, N, N_A] indices into x of the targets (last N_A rows of each block).
        num_latents, ahead, placement, shift_tokens: the settings it was built with.
    """

    positions: Tensor
    prefix_lens: Tensor
    copro_pos: Tensor
    dec_pos: Tensor
    token_idx: Tensor
    target_idx: Tensor
    num_latents: int
    ahead: int
    placement: str
    shift_tokens: bool = True

    @property
    def block_len(self) -> int:
        """S, the rows of one augmented decoder block."""
        return self.num_latents + self.token_idx.shape[-1]

    @property
    def baseline_idx(self) -> Tensor:
        """[B, N, N_A] rows of the decoder's own (prefill) logits that predict the targets."""
        return self.target_idx - 1


def block_layout(
    positions: Tensor, num_latents: int, ahead: int, placement: str = "paper", shift_tokens: bool = True
) -> BlockLayout:
    """Build the :class:`BlockLayout` for points ``positions`` [B, N] (see module docstring)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if num_latents < 1 or ahead < 1:
        raise ValueError(f"num_latents and ahead must be >= 1, got {num_latents}, {ahead}")
    positions = positions.long()
    b, n = positions.shape
    dev = positions.device
    shift = 1 if placement == "early" else 0
    start = positions - shift  # absolute position of each block's first row (= its prefix length)
    n_tok = ahead - 1 + shift
    block = num_latents + n_tok
    copro_pos = (start.unsqueeze(-1) + torch.arange(num_latents, device=dev)).reshape(b, n * num_latents)
    rows = torch.arange(block, device=dev) - (0 if shift_tokens else num_latents)
    dec_pos = (start.unsqueeze(-1) + rows).clamp_min(0).reshape(b, n * block)
    token_idx = start.unsqueeze(-1) + torch.arange(n_tok, device=dev)
    target_idx = positions.unsqueeze(-1) + torch.arange(ahead, device=dev)
    return BlockLayout(
        positions=positions,
        prefix_lens=start,
        copro_pos=copro_pos,
        dec_pos=dec_pos,
        token_idx=token_idx,
        target_idx=target_idx,
        num_latents=num_latents,
        ahead=ahead,
        placement=placement,
        shift_tokens=shift_tokens,
    )


def layout_for(latents: Any, positions: Tensor, ahead: int) -> BlockLayout:
    """The layout a latents module was trained for at points ``positions`` [B, N]: anything with
    ``num_latents``, ``placement`` and ``shift_tokens`` (a Coprocessor, a pause table, ConstantLatents).
    Every caller builds a module's layout here, so a layout setting reaches them all."""
    return block_layout(positions, latents.num_latents, ahead, latents.placement, latents.shift_tokens)

"""CacheAugmentationObjective: the multi-position training loss (README.md, "What it computes").

One call scores N augmentation points per sequence in three passes:

1. ``decoder.prefill(x)`` (no grad): the frozen cache, and the decoder's own logits,
   which give the baseline cross-entropy of every target.
2. one ``coprocessor.model.forward_blocks`` over N blocks of soft tokens -> latents;
3. one ``decoder.forward_blocks`` over N blocks of [latents ; token embeddings]; the last
   N_A rows of each block predict the targets x[p_k : p_k + N_A].

Gradients flow through the frozen decoder (step 3) into the coprocessor. Usage in any
plain PyTorch loop::

    objective = CacheAugmentationObjective(decoder, Coprocessor(decoder, 8, lora_rank=32), ahead=16)
    opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-3)
    for ids in batches:                       # long [B, T]
        out = objective(ids)                  # N random points per sequence
        out.loss.backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..models.cache import KVCache
from ..models.protocol import DecoderLike
from .coprocessor import Coprocessor
from .layout import BlockLayout, check_positions, layout_for, sample_positions


@dataclass
class ObjectiveOutput:
    """Result of one objective call.

    Attributes:
        loss: mean cross-entropy over all blocks' targets (with latents), scalar with grad.
        ce_aug: [B, N, N_A] per-target cross-entropy with latents (detached, fp32).
        ce_base: [B, N, N_A] the decoder's own cross-entropy for the same targets.
        positions: [B, N] the augmentation points used.
    """

    loss: Tensor
    ce_aug: Tensor
    ce_base: Tensor
    positions: Tensor

    def per_position(self) -> tuple[Tensor, Tensor]:
        """Mean CE per target position i = 1..N_A: (augmented [N_A], baseline [N_A])."""
        return self.ce_aug.flatten(0, 1).mean(0), self.ce_base.flatten(0, 1).mean(0)


def _chunked_ce(decoder: DecoderLike, hidden: Tensor, targets: Tensor, chunk: int = 1024) -> Tensor:
    """Per-row cross-entropy (fp32) of hidden [R, d] against targets [R], chunking the vocab matmul."""
    out = []
    for i in range(0, hidden.shape[0], chunk):
        logits = decoder.logits(hidden[i : i + chunk]).float()
        out.append(F.cross_entropy(logits, targets[i : i + chunk], reduction="none"))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


class CacheAugmentationObjective(nn.Module):
    """Loss of a coprocessor over a frozen decoder at N points per sequence, in one pass.

    Args:
        decoder: the frozen decoder (anything implementing ``models.DecoderLike``; only its
            ``prefill``, ``embed``, ``forward_blocks`` and ``logits`` are called).
        coprocessor: a :class:`Coprocessor` built on that decoder (its ``placement`` is used).
        ahead: N_A, targets scored after each augmentation point.
        num_positions: N, random points per sequence when forward gets no positions.
        min_prefix: smallest augmentation point drawn at random.
        grad_checkpoint: recompute the coprocessor and decoder block passes in backward
            (saves activation memory at the cost of one more forward).
        contrast: weight of an anti-collapse term (training only; one more decoder pass): the
            mean over points of relu(margin + CE(real latents) - CE(latents of another row's
            cache)), which a constant latent cannot lower.
        contrast_margin: that margin in nats.
        first_weight: loss weight of each point's first target (position 1) relative to the
            others (1); the loss is then the weighted mean of the CEs. Position 1 is where every
            latent method pays most against the decoder alone (issue 24, item 5).
    """

    def __init__(
        self,
        decoder: DecoderLike,
        coprocessor: Coprocessor,
        ahead: int = 16,
        *,
        num_positions: int = 8,
        min_prefix: int = 1,
        grad_checkpoint: bool = False,
        contrast: float = 0.0,
        contrast_margin: float = 0.0,
        first_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if ahead < 1:
            raise ValueError(f"ahead must be >= 1, got {ahead}")
        if not first_weight > 0:
            raise ValueError(f"first_weight must be > 0, got {first_weight}")
        self.decoder: DecoderLike = decoder
        self.coprocessor = coprocessor
        self.ahead = ahead
        self.num_positions = num_positions
        self.min_prefix = min_prefix
        self.grad_checkpoint = grad_checkpoint
        self.contrast = contrast
        self.contrast_margin = contrast_margin
        self.first_weight = float(first_weight)
        self.generator = torch.Generator().manual_seed(0)

    def layout(self, positions: Tensor) -> BlockLayout:
        """The block layout for points ``positions`` [B, N] under this objective's settings."""
        return layout_for(self.coprocessor, positions, self.ahead)

    def sample(self, batch: int, seq_len: int) -> Tensor:
        """Draw ``num_positions`` random points per sequence from this objective's generator."""
        return sample_positions(
            batch,
            seq_len,
            self.num_positions,
            self.ahead,
            generator=self.generator,
            min_prefix=self.min_prefix,
        )

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, *, baseline: bool = True) -> ObjectiveOutput:
        """Score ``input_ids`` [B, T] at ``positions`` [B, N] (random when None).

        ``baseline=False`` skips nothing expensive (the prefill runs anyway) but leaves
        ce_base as NaN; it exists for callers that never read it.
        """
        b, t = input_ids.shape
        if positions is None:
            positions = self.sample(b, t)
        positions = check_positions(positions, t, self.ahead).to(input_ids.device)
        lay = self.layout(positions)
        cache, ce_base = self.prefill(input_ids, lay, baseline=baseline)
        latents = self._run(self.coprocessor, cache, lay)  # [B, N, N_L, d]
        ce = self.score(input_ids, cache, lay, latents)
        loss = self.weighted_mean(ce)
        if self.contrast > 0 and self.training and torch.is_grad_enabled() and b > 1:
            ce_other = self.score(input_ids, cache, lay, latents.roll(1, dims=0))
            gap = ce.mean(-1) - ce_other.mean(-1)  # [B, N]: real minus another row's latents
            loss = loss + self.contrast * F.relu(gap + self.contrast_margin).mean()
        return ObjectiveOutput(loss=loss, ce_aug=ce.detach(), ce_base=ce_base, positions=positions)

    def weighted_mean(self, ce: Tensor) -> Tensor:
        """The loss over per-target CE [B, N, N_A]: the mean, with position 1 weighted by ``first_weight``."""
        if self.first_weight == 1.0:
            return ce.mean()
        w = torch.ones(ce.shape[-1], dtype=ce.dtype, device=ce.device)
        w[0] = self.first_weight
        return (ce * w).sum() / (w.sum() * ce[..., 0].numel())

    def prefill(self, input_ids: Tensor, lay: BlockLayout, *, baseline: bool = True) -> tuple[Any, Tensor]:
        """The decoder's frozen cache of ``input_ids`` [B, T] and its own CE [B, N, N_A] (fp32) on
        ``lay``'s targets (NaN when ``baseline`` is False). No gradient."""
        b = input_ids.shape[0]
        n, na = lay.positions.shape[1], lay.ahead
        # The lm_head runs only on the N*N_A rows the baseline reads (none without a baseline).
        rows = lay.baseline_idx.reshape(b, n * na) if baseline else lay.baseline_idx.new_zeros(b, 0)
        with torch.no_grad():
            lb, cache = self.decoder.prefill(input_ids, logits_at=rows)[:2]
            if baseline:
                tb = torch.gather(input_ids, 1, lay.target_idx.reshape(b, n * na))
                ce_base = F.cross_entropy(lb.flatten(0, 1).float(), tb.reshape(-1), reduction="none").view(b, n, na)
            else:
                ce_base = torch.full((b, n, na), float("nan"))
            del lb
        return cache, ce_base.float()

    def score(self, input_ids: Tensor, cache: Any, lay: BlockLayout, latents: Tensor) -> Tensor:
        """Per-target CE [B, N, N_A] (fp32, with grad) of the decoder given ``latents`` [B, N, N_L, d]
        appended to ``cache`` at ``lay``'s points (any latents: a coprocessor's, a control's)."""
        b = input_ids.shape[0]
        n, na, nl, s = lay.positions.shape[1], lay.ahead, lay.num_latents, lay.block_len
        if latents.shape[:3] != (b, n, nl):
            raise ValueError(f"latents must be [{b}, {n}, {nl}, d], got {tuple(latents.shape)}")
        dec = self.decoder
        tok_ids = torch.gather(input_ids, 1, lay.token_idx.reshape(b, -1)).view(b, n, -1)
        tok_emb = dec.embed(tok_ids.reshape(b, -1)).view(b, n, s - nl, -1)
        x = torch.cat([latents.to(tok_emb.dtype), tok_emb], dim=2).reshape(b, n * s, -1)
        hidden = self._run(self._decoder_blocks, x, lay.dec_pos, cache, lay.prefix_lens, s)
        h_t = hidden.view(b, n, s, -1)[:, :, s - na :].reshape(b * n * na, -1)
        targets = torch.gather(input_ids, 1, lay.target_idx.reshape(b, n * na)).reshape(-1)
        return _chunked_ce(dec, h_t, targets).view(b, n, na)

    def _decoder_blocks(self, x: Tensor, pos: Tensor, cache: KVCache, prefix_lens: Tensor, block_len: int) -> Tensor:
        return self.decoder.forward_blocks(x, pos, cache, prefix_lens, block_len, output="hidden")

    def _run(self, fn, *args):
        if self.grad_checkpoint and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

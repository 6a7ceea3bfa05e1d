"""``DecoderLike``: the contract between a frozen decoder and the code that drives it.

augment/ (coprocessor, objective) and generate.py are typed against this protocol and call
nothing else on a decoder: no private members, no layer internals. ``models.Decoder``
(decoder.py) implements it; any other decoder that provides these members (and, for a
coprocessor, is an ``nn.Module`` whose structure can be copied) can be driven the same way.

Shapes: B batch, T/S lengths, N blocks, d hidden, V vocab, Hkv KV heads, Dh head dim.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .cache import KVCache
from .config import DecoderConfig


@runtime_checkable
class DecoderLike(Protocol):
    """What augment/ and generate.py need from a decoder (see decoder.py for the implementation)."""

    cfg: DecoderConfig

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the weights (caches are allocated in it)."""
        ...

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        ...

    def embed(self, input_ids: Tensor) -> Tensor:
        """input_ids [B,T] -> [B,T,d] input embeddings as the model feeds them."""
        ...

    def logits(self, hidden: Tensor) -> Tensor:
        """Final-normed hidden [..., d] -> float32 logits [..., V]."""
        ...

    def prefill(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        positions: Tensor | None = None,
        return_hidden: bool = False,
        capacity: int | None = None,
        logits_at: Tensor | None = None,
    ) -> tuple[Tensor, KVCache] | tuple[Tensor, KVCache, Tensor]:
        """Causal pass over [B,T] -> (float32 logits [B,T,V] or [B,R,V] at ``logits_at`` [B,R],
        KVCache[, hidden [B,T,d]])."""
        ...

    def forward_blocks(
        self,
        inputs_embeds: Tensor,
        positions: Tensor,
        cache: KVCache,
        prefix_lens: Tensor,
        block_len: int,
        *,
        output: str = "logits",
    ) -> Tensor:
        """N blocks [B,N*S,d], block k over cache[:p_k] and causally itself -> logits or hidden."""
        ...

    def extend(
        self,
        input_ids: Tensor | None = None,
        *,
        cache: KVCache,
        inputs_embeds: Tensor | None = None,
        return_hidden: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Append S tokens (ids or embeddings) to ``cache`` in place -> float32 logits [B,S,V]."""
        ...

    def decode_step(self, input_ids: Tensor | None, cache: KVCache, *, inputs_embeds: Tensor | None = None) -> Tensor:
        """One token per request at position cache.lens[b], cache advanced -> logits [B,V]."""
        ...

    def decode_step_static(
        self, input_ids: Tensor, k: list[Tensor], v: list[Tensor], lens: Tensor, plan: object = None
    ) -> Tensor:
        """One token per request over static cache storage (fixed shapes, lens not advanced) -> [B,V]."""
        ...

    def plan_decode(
        self, lens: Tensor, kv_capacity: int, max_len: int, dtype: torch.dtype | None = None,
        shared_len: int | None = None,
    ) -> object:
        """The decode plan every layer of a step reuses (ops.plan_decode, no read-back)."""
        ...

    def decode_step_shared(
        self, input_ids: Tensor, shared_k: list[Tensor], shared_v: list[Tensor], suffix: KVCache
    ) -> Tensor:
        """One token for n requests over a shared prefix ([Hkv,T,Dh] per layer) + own suffixes -> [n,V]."""
        ...

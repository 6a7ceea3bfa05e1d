"""Latents for a prompt, computed once: the paper's asynchronous / offline mode.

* ``augment(decoder, coprocessor, prompt_ids)`` prefills the prompt and computes its latents
  (optionally on a separate CUDA stream: the returned :class:`AugmentHandle` makes the
  decoding stream wait for them at first use). ``generation.generate(..., latents=handle)``
  appends them and decodes (reusing the handle's prefilled cache).
* ``save_latents`` / ``load_latents``: latents for a prompt computed once, stored in
  safetensors with the prompt's token ids, and reused.

Placement "early" (see augment.layout): the cache holds the prompt minus its last token,
the latents go after it, and the last prompt token is decoded after the latents.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from cacheaug_engine.augment.coprocessor import Coprocessor, require_shifted
from cacheaug_engine.fileio import atomic_write
from cacheaug_engine.models import DecoderLike, KVCache


def _empty_cache(decoder: DecoderLike, batch: int, capacity: int) -> KVCache:
    c = decoder.cfg
    return KVCache.empty(
        c.num_layers, batch, c.num_kv_heads, c.head_dim, capacity, dtype=decoder.dtype, device=decoder.device
    )


@torch.no_grad()
def prefill_prefix(decoder: DecoderLike, ids: Tensor, capacity: int) -> KVCache:
    """Cache of ``ids`` [1, P] (P may be 0) with room for ``capacity`` entries."""
    if ids.shape[1] == 0:
        return _empty_cache(decoder, ids.shape[0], capacity)
    return decoder.prefill(ids, capacity=capacity, logits_at=ids.new_zeros(ids.shape[0], 0))[1]


@dataclass
class AugmentHandle:
    """Latents for one prompt, possibly still being computed on another CUDA stream.

    Attributes:
        latents: [1, N_L, d] (valid once :meth:`wait` returned).
        cache: the decoder's cache of the prompt prefix the latents were computed from
            (None when the latents were loaded from a file).
        prompt_ids: the prompt, long [1, P].
        placement: "paper" or "early".
    """

    latents: Tensor
    cache: KVCache | None
    prompt_ids: Tensor
    placement: str
    event: Any = None
    _waited: bool = field(default=False, repr=False)

    def wait(self) -> Tensor:
        """Make the current stream wait for the latents (no-op on the CPU) and return them."""
        if self.event is not None and not self._waited:
            cur = torch.cuda.current_stream(self.latents.device)
            cur.wait_event(self.event)
            self.latents.record_stream(cur)
            if self.cache is not None:
                for t in self.cache.k + self.cache.v:
                    t.record_stream(cur)
            self._waited = True
        return self.latents

    def ready(self) -> bool:
        """True when the latents are computed (always on the CPU)."""
        return self.event is None or self.event.query()


@torch.no_grad()
def augment(
    decoder: DecoderLike,
    coprocessor: Coprocessor,
    prompt_ids: Tensor,
    *,
    stream: Any = None,
    capacity: int | None = None,
) -> AugmentHandle:
    """Prefill the prompt [1, P] and compute its latents [1, N_L, d].

    With ``stream`` (a torch.cuda.Stream) the coprocessor runs on that stream and this
    returns at once; :meth:`AugmentHandle.wait` (called by ``generate`` when it first
    needs the latents) orders the current stream after it.
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1 or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids must be [1, P] with P >= 1, got {tuple(prompt_ids.shape)}")
    require_shifted(coprocessor, "augment")
    p = prompt_ids.shape[1]
    start = p - 1 if coprocessor.placement == "early" else p
    cap = capacity if capacity is not None else start + coprocessor.num_latents + 64
    cache = prefill_prefix(decoder, prompt_ids[:, :start], cap)
    pos = torch.tensor([[p]], device=prompt_ids.device)
    if stream is None:
        lat = coprocessor.latents_at(cache, pos)[:, 0]
        return AugmentHandle(lat, cache, prompt_ids, coprocessor.placement)
    stream.wait_stream(torch.cuda.current_stream(prompt_ids.device))
    with torch.cuda.stream(stream):
        lat = coprocessor.latents_at(cache, pos)[:, 0]
        event = stream.record_event()
    return AugmentHandle(lat, cache, prompt_ids, coprocessor.placement, event=event)


def save_latents(path: str | os.PathLike, handle: AugmentHandle, info: dict[str, Any] | None = None) -> Path:
    """Store a prompt's latents (fp32) and its token ids in a safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "prompt_ids": json.dumps(handle.prompt_ids[0].tolist()),
        "placement": handle.placement,
        "info": json.dumps(info or {}),
    }
    latents = {"latents": handle.wait()[0].float().contiguous().cpu()}
    return atomic_write(path, lambda tmp: save_file(latents, str(tmp), metadata=meta))


def load_latents(path: str | os.PathLike, device: str | torch.device = "cpu") -> AugmentHandle:
    """Read latents saved by :func:`save_latents` (the prompt cache is rebuilt by ``generate``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such latents file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            lat = f.get_tensor("latents")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{path}: not a latents file ({type(e).__name__}: {e})") from None
    if "prompt_ids" not in meta or lat.dim() != 2:
        raise ValueError(f"{path}: not a latents file written by cacheaug (missing prompt_ids)")
    ids = torch.tensor(json.loads(meta["prompt_ids"]), dtype=torch.long, device=device).view(1, -1)
    return AugmentHandle(lat.unsqueeze(0).to(device), None, ids, meta.get("placement", "paper"))

"""Augmented prompts as input-embedding rows: what a serving engine that takes prompt embeddings needs.

The method's latents are input-embedding rows appended to the prompt, so an engine that accepts a
full sequence of prompt embeddings (vLLM: ``{"prompt_embeds": tensor[seq, hidden]}``) decodes an
augmented prompt without knowing about the coprocessor. The rows are

* placement "paper": ``embed(prompt)`` then the N_L latents;
* placement "early": ``embed(prompt[:-1])``, the N_L latents, then ``embed(prompt[-1])``,

where ``embed`` is the decoder's input embedding *as the model feeds it* (``DecoderLike.embed``:
scaling included, e.g. Gemma's x sqrt(d)). This is the space vLLM's models take prompt embeddings
in (their ``embed_input_ids`` applies the same scaling and ``inputs_embeds`` are used as given),
and the space our decoder's ``extend(inputs_embeds=...)`` appends latents in, so the engine sees
exactly the rows our own ``generation.generate`` feeds.

:class:`PromptAugmenter` computes latents once per distinct prompt (the paper's offline mode): a
batch of prompts runs one right-padded prefill and one coprocessor pass over the prompts not yet
cached; latents are kept (on the CPU) in an LRU cache keyed by the hash of the prompt's token ids.
Nothing here imports vLLM.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cacheaug_engine.augment.coprocessor import Coprocessor, require_shifted
from cacheaug_engine.checks import check_int
from cacheaug_engine.models import DecoderLike, KVCache


def prompt_key(ids: Sequence[int]) -> str:
    """The cache key of a prompt: sha256 of its token ids (int64, little endian), hex."""
    return hashlib.sha256(torch.tensor(list(ids), dtype=torch.int64).numpy().tobytes()).hexdigest()


def _check_rows(rows: Sequence[Sequence[int]], vocab: int) -> list[list[int]]:
    out = []
    for i, r in enumerate(rows):
        r = [int(x) for x in r]
        if not r:
            raise ValueError(f"prompts[{i}]: expected >= 1 token, got an empty prompt")
        bad = [x for x in r if x < 0 or x >= vocab]
        if bad:
            raise ValueError(f"prompts[{i}]: token ids must lie in [0, {vocab}), got {bad[:3]}")
        out.append(r)
    return out


@torch.no_grad()
def embed_rows(decoder: DecoderLike, ids: Sequence[int], latents: Tensor, placement: str) -> Tensor:
    """One augmented prompt as input-embedding rows [P + N_L, d] (module docstring), on the CPU.

    Args:
        decoder: the frozen decoder the latents were computed on (its ``embed``: scaling included).
        ids: the prompt's token ids (>= 1).
        latents: [N_L, d] for this prompt.
        placement: "paper" or "early".
    """
    if placement not in ("paper", "early"):
        raise ValueError(f"placement: expected 'paper' or 'early', got {placement!r}")
    if latents.dim() != 2 or latents.shape[1] != decoder.cfg.hidden_size:
        raise ValueError(f"latents: expected [N_L, {decoder.cfg.hidden_size}], got {tuple(latents.shape)}")
    x = decoder.embed(torch.tensor([list(ids)], dtype=torch.long, device=decoder.device))[0]
    lat = latents.to(device=x.device, dtype=x.dtype)
    rows = [x[:-1], lat, x[-1:]] if placement == "early" else [x, lat]
    return torch.cat(rows).float().cpu().contiguous()


@dataclass
class AugmentStats:
    """Counters of a :class:`PromptAugmenter` (tests and the benchmark read them)."""

    requests: int = 0  # prompts asked for
    hits: int = 0  # served without a coprocessor run (cached, or a repeat within the batch)
    computed: int = 0  # prompts whose latents the coprocessor computed
    passes: int = 0  # coprocessor batch passes
    seconds: float = 0.0  # wall time in the coprocessor (prefill + latents)


class PromptAugmenter:
    """Our decoder + coprocessor: token ids -> augmented prompt-embedding rows, latents cached by prompt.

    Args:
        decoder: the frozen decoder the coprocessor was trained on (fp32 for parity with the engine).
        coprocessor: its coprocessor (eval mode is set here).
        cache_size: prompts whose latents are kept (LRU; 0 = no cache).
        max_batch: prompts per coprocessor pass.
    """

    def __init__(self, decoder: DecoderLike, coprocessor: Coprocessor, *, cache_size: int = 4096,
                 max_batch: int = 32) -> None:
        check_int(cache_size, "cache_size", 0)
        check_int(max_batch, "max_batch", 1)
        require_shifted(coprocessor, "vLLM prompt embeddings")  # vLLM numbers every row's position itself
        self.decoder = decoder
        self.coprocessor = coprocessor.eval()
        self.cache_size = cache_size
        self.max_batch = max_batch
        self.stats = AugmentStats()
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self._lock = threading.Lock()  # the server calls from a worker thread; tests from the main one

    @property
    def placement(self) -> str:
        """"paper" or "early" (the coprocessor's)."""
        return self.coprocessor.placement

    @property
    def num_latents(self) -> int:
        """N_L: rows appended per prompt."""
        return self.coprocessor.num_latents

    def cached(self, ids: Sequence[int]) -> bool:
        """Whether this prompt's latents are in the cache."""
        return prompt_key(ids) in self._cache

    def latents(self, prompts: Sequence[Sequence[int]]) -> list[Tensor]:
        """Latents [N_L, d] (fp32, CPU) per prompt; the coprocessor runs once per distinct uncached prompt."""
        import time

        rows = _check_rows(prompts, self.decoder.cfg.vocab_size)
        keys = [prompt_key(r) for r in rows]
        with self._lock:
            self.stats.requests += len(rows)
            todo: dict[str, list[int]] = {}
            for k, r in zip(keys, rows, strict=True):
                if k in self._cache:
                    self._cache.move_to_end(k)
                elif k not in todo:
                    todo[k] = r
            self.stats.hits += len(rows) - len(todo)
            fresh: dict[str, Tensor] = {}
            items = list(todo.items())
            t0 = time.perf_counter()
            for s in range(0, len(items), self.max_batch):
                chunk = items[s : s + self.max_batch]
                lat = self._compute([r for _, r in chunk])
                self.stats.passes += 1
                for (k, _), z in zip(chunk, lat, strict=True):
                    fresh[k] = z
            self.stats.seconds += time.perf_counter() - t0
            self.stats.computed += len(items)
            out = [fresh[k] if k in fresh else self._cache[k] for k in keys]
            if self.cache_size:
                for k, z in fresh.items():
                    self._cache[k] = z
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return out

    def prompt_embeds(self, prompts: Sequence[Sequence[int]]) -> list[Tensor]:
        """Augmented prompt rows [P + N_L, d] (fp32, CPU) per prompt (module docstring)."""
        lat = self.latents(prompts)
        return [embed_rows(self.decoder, r, z, self.placement) for r, z in zip(prompts, lat, strict=True)]

    @torch.no_grad()
    def _compute(self, rows: list[list[int]]) -> list[Tensor]:
        """One right-padded prefill of the cache prefixes and one coprocessor pass -> [N_L, d] per row."""
        dec, dev = self.decoder, self.decoder.device
        b = len(rows)
        early = self.placement == "early"
        lens = [len(r) for r in rows]
        pre = [p - 1 if early else p for p in lens]
        tp = max(pre)
        cap = tp + self.num_latents
        if tp:
            ids = torch.zeros(b, tp, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : pre[i]] = torch.tensor(r[: pre[i]], dtype=torch.long)
            cache = dec.prefill(ids.to(dev), capacity=cap, logits_at=torch.zeros(b, 0, dtype=torch.long, device=dev))[1]
        else:
            c = dec.cfg
            cache = KVCache.empty(c.num_layers, b, c.num_kv_heads, c.head_dim, cap, dtype=dec.dtype, device=dev)
        cache.lens = torch.tensor(pre, dtype=torch.long, device=dev)
        cache.max_len = tp
        pos = torch.tensor(lens, dtype=torch.long, device=dev).view(b, 1)
        lat = self.coprocessor.latents_at(cache, pos)[:, 0]  # [B, N_L, d]
        return [z.float().cpu().clone() for z in lat]


__all__ = ["PromptAugmenter", "AugmentStats", "embed_rows", "prompt_key"]

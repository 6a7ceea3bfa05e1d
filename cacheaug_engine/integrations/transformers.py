"""transformers adapter: the augmented cache out to the user's own ``model.generate``.

:func:`augmented_generate_inputs` - the prompt's cache plus the coprocessor's latents as a
transformers ``DynamicCache`` and the matching ``input_ids`` / ``attention_mask`` (latents stand
as placeholder ids), so ``hf_model.generate(**kwargs, max_new_tokens=n)`` continues from the
augmented cache. Left-padded batches of different lengths work. (Training under
``transformers.Trainer`` / ``accelerate``: integrations/transformers_trainer.py.)

transformers (5.x) is an optional extra: importing this module requires it.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

from ..augment.coprocessor import Coprocessor
from ..models.cache import KVCache
from ..models.protocol import DecoderLike


def _rows(input_ids: Tensor, attention_mask: Tensor | None) -> list[Tensor]:
    """The prompts of a (left- or right-padded) batch, each a 1-D tensor of its real tokens."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        got = f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, Tensor) else type(input_ids)
        raise ValueError(f"input_ids: expected an int32/int64 tensor [B, P], got {got}")
    if attention_mask is None:
        return list(input_ids)
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
    rows = [ids[m.bool()] for ids, m in zip(input_ids, attention_mask.to(input_ids.device), strict=True)]
    for m, r in zip(attention_mask, rows, strict=True):
        n = len(r)
        if n == 0 or not (bool(m[-n:].all()) or bool(m[:n].all())):
            raise ValueError(
                "attention_mask: every row needs >= 1 token and one contiguous (left- or right-) padded run"
            )
    return rows


def _cache_key(decoder: DecoderLike) -> str:
    """The keyword under which the generating model takes its cache ("cache" in newer 5.x)."""
    hf = getattr(decoder, "hf", None)
    fwd = getattr(type(hf), "forward", None) if hf is not None else None
    if fwd is None:
        from transformers import LlamaForCausalLM

        fwd = LlamaForCausalLM.forward
    return "cache" if "cache" in inspect.signature(fwd).parameters else "past_key_values"


@torch.no_grad()
def augmented_generate_inputs(
    decoder: DecoderLike, coprocessor: Coprocessor, input_ids: Tensor, attention_mask: Tensor | None = None, *,
    config: Any = None, placeholder_id: int | None = None,
) -> dict[str, Any]:
    """kwargs for ``hf_model.generate(**kwargs, max_new_tokens=n)`` that continue from the augmented cache.

    Args:
        decoder: the frozen decoder the coprocessor was built on (a ``TransformersDecoder`` wrapping
            the very model that will generate, or a native ``Decoder`` with the same weights).
        coprocessor: its coprocessor (placement "paper" or "early").
        input_ids: [B, P] prompts; with ``attention_mask`` [B, P] (1 = token), rows of different
            lengths, padded on the left (the transformers convention) or on the right.
        config: the generating model's config (default ``decoder.hf.config`` of a TransformersDecoder):
            the ``DynamicCache`` takes its layer types (sliding-window layers) from it.
        placeholder_id: token id standing for each latent in ``input_ids`` (never embedded: those
            positions are in the cache); default the config's pad_token_id, else 0.

    Returns a dict with ``input_ids`` [B, L] (left padded: prompt, then N_L placeholders; for
    "early", the prompt's last token after them), ``attention_mask`` [B, L], the cache under the
    keyword the model's forward takes (``cache`` in transformers >= 5.2x, where ``past_key_values``
    is deprecated; ``past_key_values`` before): a DynamicCache holding L - 1 entries per layer (the
    prompt and the latents, computed by the engine) and, for placement "paper", ``inputs_embeds``
    [B, L, d] whose last row is the last latent (transformers feeds only the rows past the cache,
    i.e. that one). ``generate`` returns
    ``input_ids`` followed by the new tokens: slice ``out[:, L:]``.
    """
    rows = _rows(input_ids, attention_mask)
    if config is None:
        hf = getattr(decoder, "hf", None)
        config = getattr(hf, "config", None)
    if placeholder_id is None:
        placeholder_id = getattr(config, "pad_token_id", None)
        placeholder_id = 0 if placeholder_id is None else int(placeholder_id)
    dev = decoder.device
    b, nl = len(rows), coprocessor.num_latents
    early = coprocessor.placement == "early"
    lens = [len(r) for r in rows]
    pre = [p - 1 if early else p for p in lens]  # cache prefix per row (before the latents)
    # 1. right-padded prefill of the prefixes, then the latents at point P_b, appended by extend
    tp = max(pre)
    ids = torch.zeros(b, max(tp, 1), dtype=torch.long, device=dev)
    for i, r in enumerate(rows):
        ids[i, : pre[i]] = r[: pre[i]].to(dev)
    cache = decoder.prefill(ids[:, :tp], capacity=tp + nl, logits_at=ids.new_zeros(b, 0))[1] if tp else None
    if cache is None:
        c = decoder.cfg
        cache = KVCache.empty(c.num_layers, b, c.num_kv_heads, c.head_dim, nl, dtype=decoder.dtype, device=dev)
    cache.lens = torch.tensor(pre, dtype=torch.long, device=dev)
    cache.max_len = tp
    latents = coprocessor.latents_at(cache, torch.tensor(lens, device=dev).view(b, 1))[:, 0]  # [B, N_L, d]
    decoder.extend(inputs_embeds=latents.to(decoder.dtype), cache=cache)
    # 2. left-aligned transformers layout: row b = [pad, prefix, latents (, last prompt token)]
    kept = [q + nl - (0 if early else 1) for q in pre]  # cached entries per row (L - 1 minus padding)
    width = max(kept)
    keys: list[tuple[Tensor, Tensor]] = []
    for k, v in zip(cache.k, cache.v, strict=True):
        hk = k.new_zeros(b, k.shape[1], width, k.shape[3])
        hv = v.new_zeros(b, v.shape[1], width, v.shape[3])
        for i, n in enumerate(kept):
            hk[i, :, width - n :] = k[i, :, :n]
            hv[i, :, width - n :] = v[i, :, :n]
        keys.append((hk, hv))
    total = width + 1
    out_ids = torch.full((b, total), placeholder_id, dtype=torch.long, device=dev)
    mask = torch.zeros(b, total, dtype=torch.long, device=dev)
    for i, r in enumerate(rows):
        n = kept[i] + 1
        mask[i, total - n :] = 1
        out_ids[i, total - n : total - n + pre[i]] = r[: pre[i]].to(dev)
        if early:
            out_ids[i, -1] = r[-1].to(dev)
    kwargs: dict[str, Any] = {
        "input_ids": out_ids, "attention_mask": mask,
        _cache_key(decoder): DynamicCache(ddp_cache_data=keys, config=config),
    }
    if not early:
        emb = decoder.embed(out_ids)
        emb[:, -1] = latents[:, -1].to(emb.dtype)
        kwargs["inputs_embeds"] = emb
    return kwargs

"""The one generation path: many prompts of different lengths, augmented and plain rows mixed.

    from cacheaug_engine.generation import generate
    out = generate(decoder, [ids_a, ids_b, ids_c], coprocessor=cop, augmented=[True, False, True])
    out.tokens[1]                     # the new tokens of prompt b (plain decoder)
    generate(decoder, ids_a, latents=handle)              # latents computed earlier (offline mode)
    generate(decoder, ids_a, coprocessor=cop, num_samples=4, temperature=0.8)   # shared prompt cache

A single prompt is a batch of one; ``num_samples`` continuations of one prompt decode over its
shared cache. Every case is: prefill + augment (below), then one decode loop (sampling.py).

How (gpt-fast style): one right-padded prefill of every row's cache prefix (row b valid at
[0, lens[b])); one coprocessor block pass computes every augmented row's latents; one
``extend`` appends each row's tail (latents, and for the "early" placement the last prompt
token) and the per-row lens are set from host-side lengths; then decode steps over a cache
allocated once with room for every token. Sampling stays on the device (argmax, or the
exponential race ``argmax(p / E)``, E ~ Exp(1), with a device generator), tokens are kept in a
device tensor and read back once at the end: the only per-token host read is the stop check,
and only when ``eos_id`` is given.

Step modes: "dynamic" attends over the entries written so far (the CPU default); "static"
attends over the whole capacity with per-request lengths (fixed shapes); "graph" is "static"
under ``torch.compile(mode="reduce-overhead")`` - CUDA graphs - and is the default on CUDA.
"graph" needs a CUDA device and raises on any other (it cannot be exercised on a CPU-only machine).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cacheaug_engine.augment.coprocessor import Coprocessor, require_shifted
from cacheaug_engine.generation.latents import AugmentHandle
from cacheaug_engine.generation.sampling import decode_tokens
from cacheaug_engine.models import DecoderLike, KVCache
from cacheaug_engine.models.config import warn_past_positions

STEP_MODES = ("auto", "dynamic", "static", "graph")


@dataclass
class Generation:
    """Output of generation: new token ids per row (prompt excluded).

    Attributes:
        tokens: per row, the generated ids (up to and including eos_id when it was produced).
        augmented: whether any row was augmented.
        prompt_len: length of the first prompt.
        rows_augmented / prompt_lens: per row.
    """

    tokens: list[list[int]]
    augmented: bool
    prompt_len: int
    rows_augmented: list[bool] = field(default_factory=list)
    prompt_lens: list[int] = field(default_factory=list)






def _as_rows(prompts: Tensor | Sequence[Tensor | Sequence[int]]) -> list[list[int]]:
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompts: expected [B, P] or a list of 1-D prompts, got shape {tuple(prompts.shape)}")
        rows = prompts.tolist()
    else:
        rows = [p.view(-1).tolist() if isinstance(p, Tensor) else [int(x) for x in p] for p in prompts]
    if not rows or any(len(r) < 1 for r in rows):
        raise ValueError("prompts: expected at least one prompt, each with >= 1 token")
    return rows


def _step_mode(mode: str, device: torch.device) -> str:
    if mode not in STEP_MODES:
        raise ValueError(f"step: expected one of {STEP_MODES}, got {mode!r}")
    if mode == "auto":
        return "graph" if device.type == "cuda" else "dynamic"
    if mode == "graph" and device.type != "cuda":
        raise ValueError(
            f"step='graph' runs the decode step under torch.compile(mode='reduce-overhead') (CUDA graphs) "
            f"and needs a CUDA device; the decoder is on {device.type} (use step='dynamic' or 'static')"
        )
    return mode


@torch.no_grad()
def generate(
    decoder: DecoderLike,
    prompts: Tensor | Sequence[Tensor | Sequence[int]],
    *,
    coprocessor: Coprocessor | None = None,
    latents: AugmentHandle | None = None,
    augmented: bool | Sequence[bool] = True,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    num_samples: int = 1,
    eos_id: int | None = None,
    step: str = "auto",
) -> Generation:
    """Continue prompts of any lengths in one batch; augmented when a coprocessor or latents are given.

    Args:
        prompts: [B, P] ids, or a list of B prompts (1-D tensors or lists of ids), lengths may differ.
            A single prompt is a batch of one.
        coprocessor: when given, rows with ``augmented`` True get its latents (placement from it).
        latents: precomputed latents of ONE prompt (``latents.augment`` / ``latents.load_latents``),
            used instead of running a coprocessor (the paper's offline mode).
        augmented: one flag for all rows or one per row (ignored without a coprocessor or latents).
        max_new_tokens: tokens generated per row (>= 1).
        temperature, top_k, seed: 0 = greedy; else top-k sampling on the device from ``seed``.
        num_samples: > 1 decodes that many continuations of ONE prompt over its shared cache
            (``decoder.decode_step_shared``, i.e. ``ops.cascade_decode``: the prompt+latents cache is
            read in place, never copied; each sample has its own suffix).
        eos_id: a row stops after producing it.
        step: "auto" | "dynamic" | "static" | "graph" (see the module docstring).

    Returns a :class:`Generation` with one token list per row (per sample with ``num_samples``).
    Rows that need more positions (prompt + latents + new tokens) than the model was trained for
    (``max_position_embeddings``) still run, with one ``PositionRangeWarning`` per call.
    """
    require_shifted(coprocessor, "generate")
    rows = _as_rows(prompts)
    b = len(rows)
    for name, value in (("max_new_tokens", max_new_tokens), ("num_samples", num_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if (latents is not None or num_samples > 1) and b != 1:
        what = "latents=" if latents is not None else "num_samples > 1"
        raise ValueError(f"prompts: {what} needs exactly one prompt, got {b}")
    if latents is not None and latents.prompt_ids.view(-1).tolist() != rows[0]:
        raise ValueError("latents: the latents were computed for a different prompt")
    flags = [bool(augmented)] * b if isinstance(augmented, bool) else [bool(a) for a in augmented]
    if len(flags) != b:
        raise ValueError(f"augmented: expected {b} flags (one per prompt), got {len(flags)}")
    if coprocessor is None and latents is None:
        flags = [False] * b
    dev = decoder.device
    mode = _step_mode(step, dev)
    if num_samples > 1 and step not in ("auto", "dynamic"):
        raise ValueError(f"step: num_samples > 1 decodes over the shared prompt cache in 'dynamic' mode, got {step!r}")
    logits, cache = _prefill_and_augment(decoder, rows, flags, coprocessor, latents, max_new_tokens)
    kw = dict(temperature=temperature, top_k=top_k, seed=seed, eos_id=eos_id)
    p_lens = [len(r) for r in rows]
    if num_samples == 1:
        tokens = decode_tokens(_stepper(decoder, cache, mode), logits, max_new_tokens, **kw)
        return Generation(tokens, any(flags), p_lens[0], flags, p_lens)
    t = cache.max_len
    shared_k = [k[0, :, :t] for k in cache.k]  # views: the prompt (+latents) cache is never copied
    shared_v = [v[0, :, :t] for v in cache.v]
    c = decoder.cfg
    suffix = KVCache.empty(c.num_layers, num_samples, c.num_kv_heads, c.head_dim, max_new_tokens,
                           dtype=decoder.dtype, device=dev)
    tokens = decode_tokens(
        lambda ids: decoder.decode_step_shared(ids, shared_k, shared_v, suffix), logits.expand(num_samples, -1),
        max_new_tokens, **kw,
    )
    return Generation(tokens, flags[0], p_lens[0], flags * num_samples, p_lens * num_samples)


def _prefill_and_augment(
    decoder: DecoderLike, rows: list[list[int]], flags: list[bool], coprocessor: Coprocessor | None,
    handle: AugmentHandle | None, max_new_tokens: int,
) -> tuple[Tensor, KVCache]:
    """Next-token logits [B, V] after each row's prompt (and latents), and the cache they were read from,
    with room for ``max_new_tokens`` more entries per row."""
    b = len(rows)
    dev = decoder.device
    placement = handle.placement if handle is not None else (coprocessor.placement if coprocessor else "paper")
    early = placement == "early"
    if handle is not None:
        nl = handle.latents.shape[1]
    else:
        nl = coprocessor.num_latents if coprocessor is not None else 0
    p_lens = [len(r) for r in rows]
    pre = [p - 1 if (f and early) else p for p, f in zip(p_lens, flags, strict=True)]  # cache prefix per row
    tail = [(nl + (1 if early else 0)) if f else 0 for f in flags]  # latents (+ last prompt token) per row
    total = [a + t for a, t in zip(pre, tail, strict=True)]
    capacity = max(total) + max_new_tokens
    warn_past_positions(decoder.cfg, capacity, f"generate: the longest row's prompt ({max(p_lens)} tokens)"
                        f"{f' + {nl} latents' if any(flags) else ''} + {max_new_tokens} new tokens")
    logits = None
    reuse = handle is not None and handle.cache is not None and handle.cache.capacity >= capacity
    if reuse:  # augment() already prefilled this prompt's cache: it grows in place, so it is used once
        assert handle is not None
        cache, handle.cache = handle.cache, None
    else:
        # 1. one right-padded prefill: row b is valid at [0, pre[b]); padding lies past its lens.
        tp = max(pre)
        ids = torch.zeros(b, tp, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : pre[i]] = torch.tensor(r[: pre[i]], dtype=torch.long)
        ids = ids.to(dev)
        last = torch.tensor([max(p - 1, 0) for p in pre], dtype=torch.long).view(b, 1)
        logits_last, cache = decoder.prefill(ids, capacity=capacity, logits_at=last if tp else last[:, :0])[:2]
        cache.lens = torch.tensor(pre, dtype=torch.long).to(dev)
        cache.max_len = tp
        logits = logits_last[:, 0] if tp else None
    # 2. latents of the augmented rows and their tails, appended by one extend.
    if any(flags):
        if handle is not None:
            latents = handle.wait().to(dev)
        else:
            assert coprocessor is not None
            pos = torch.tensor(p_lens, dtype=torch.long).view(b, 1).to(dev)
            latents = coprocessor.latents_at(cache, pos)[:, 0]  # [B, N_L, d]
        s = max(tail)
        x = torch.zeros(b, s, decoder.cfg.hidden_size, dtype=decoder.dtype, device=dev)
        last_tok = decoder.embed(torch.tensor([[r[-1]] for r in rows]).to(dev))[:, 0]
        for i, f in enumerate(flags):
            if f:
                x[i, :nl] = latents[i].to(x.dtype)
                if early:
                    x[i, nl] = last_tok[i]
        ext = decoder.extend(inputs_embeds=x, cache=cache)
        cache.lens = torch.tensor(total, dtype=torch.long).to(dev)
        cache.max_len = max(total)
        tail_last = torch.tensor([max(t - 1, 0) for t in tail]).to(dev)
        ext_logits = ext[torch.arange(b, device=dev), tail_last]
        use_ext = torch.tensor([t > 0 for t in tail]).view(b, 1).to(dev)
        logits = ext_logits if logits is None else torch.where(use_ext, ext_logits, logits)
    assert logits is not None
    return logits, cache


def _stepper(decoder: DecoderLike, cache: KVCache, mode: str) -> Callable[[Tensor], Tensor]:
    """ids [B] -> logits [B, V], advancing ``cache`` by one entry per request."""
    if mode == "dynamic":
        return lambda ids: decoder.decode_step(ids, cache)
    cap = cache.capacity
    lens = cache.lens.clone()  # a buffer updated in place: its address stays fixed for CUDA graphs
    cache.lens = lens
    plan = decoder.plan_decode(lens, cap, cap)  # backend + workspace once, outside the captured step
    fn = decoder.decode_step_static
    if mode == "graph":
        # The cache storage is written in place by the captured step: mark it static (as HF's
        # StaticCache does) so CUDA graphs neither copy it per replay nor refuse the mutation.
        for t in [*cache.k, *cache.v, lens]:
            torch._dynamo.mark_static_address(t)
        fn = torch.compile(fn, mode="reduce-overhead", fullgraph=True)

    def step(ids: Tensor) -> Tensor:
        if cache.max_len + 1 > cap:
            raise ValueError(f"the static cache is full ({cap} entries)")
        logits = fn(ids, cache.k, cache.v, lens, plan)
        lens.add_(1)
        cache.max_len += 1
        return logits

    return step


__all__ = ["Generation", "generate", "STEP_MODES"]

"""Batched decoding: many prompts of different lengths, augmented and plain rows mixed, one static cache.

    from cacheaug_engine.decoding import generate_batch
    out = generate_batch(decoder, [ids_a, ids_b, ids_c], coprocessor=cop, augmented=[True, False, True])
    out.tokens[1]                     # the new tokens of prompt b (plain decoder)

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

from .augment.coprocessor import Coprocessor
from .models import DecoderLike, KVCache

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


def pick_tokens(logits: Tensor, temperature: float, top_k: int, gen: torch.Generator | None) -> Tensor:
    """Next token per row of logits [n, V] without host syncs: argmax at temperature 0, else top-k
    sampling by the exponential race (argmax of p / E with E ~ Exp(1) drawn from ``gen``, which
    must live on logits' device)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    race = torch.empty_like(probs).exponential_(1.0, generator=gen)
    return (probs / race).argmax(-1)


def decode_tokens(
    step: Callable[[Tensor], Tensor], logits: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
    top_k: int = 0, seed: int = 0, eos_id: int | None = None,
) -> list[list[int]]:
    """Sample from ``logits`` [B, V], feed the tokens to ``step`` (ids [B] -> next logits [B, V]),
    up to max_new_tokens per row; a row stops after eos_id. One host read per token (the stop
    check, only with eos_id), one at the end."""
    b = logits.shape[0]
    dev = logits.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = torch.zeros(b, max_new_tokens, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    steps = max_new_tokens
    for t in range(max_new_tokens):
        nxt = pick_tokens(logits, temperature, top_k, gen)
        out[:, t] = nxt
        if eos_id is not None:
            done = done | (nxt == eos_id)
            if bool(done.all()):  # the stop check: the one host read per token
                steps = t + 1
                break
        if t + 1 < max_new_tokens:
            logits = step(nxt)
    rows = out[:, :steps].tolist()
    if eos_id is not None:
        rows = [r[: r.index(eos_id) + 1] if eos_id in r else r for r in rows]
    return rows


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
def generate_batch(
    decoder: DecoderLike, prompts: Tensor | Sequence[Tensor | Sequence[int]], *,
    coprocessor: Coprocessor | None = None, augmented: bool | Sequence[bool] = True, max_new_tokens: int = 32,
    temperature: float = 0.0, top_k: int = 0, seed: int = 0, eos_id: int | None = None, step: str = "auto",
) -> Generation:
    """Continue B prompts of any lengths in one batch.

    Args:
        prompts: [B, P] ids, or a list of B prompts (1-D tensors or lists of ids), lengths may differ.
        coprocessor: when given, rows with ``augmented`` True get its latents (placement from it).
        augmented: one flag for all rows or one per row (ignored without a coprocessor).
        max_new_tokens, temperature, top_k, seed, eos_id: as in generate.generate.
        step: "auto" | "dynamic" | "static" | "graph" (see the module docstring).

    Returns a :class:`Generation` with one token list per row.
    """
    rows = _as_rows(prompts)
    b = len(rows)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    flags = [bool(augmented)] * b if isinstance(augmented, bool) else [bool(a) for a in augmented]
    if len(flags) != b:
        raise ValueError(f"augmented: expected {b} flags (one per prompt), got {len(flags)}")
    if coprocessor is None:
        flags = [False] * b
    dev = decoder.device
    mode = _step_mode(step, dev)
    early = coprocessor is not None and coprocessor.placement == "early"
    nl = coprocessor.num_latents if coprocessor is not None else 0
    p_lens = [len(r) for r in rows]
    pre = [p - 1 if (f and early) else p for p, f in zip(p_lens, flags, strict=True)]  # cache prefix per row
    tail = [(nl + (1 if early else 0)) if f else 0 for f in flags]  # latents (+ last prompt token) per row
    total = [a + t for a, t in zip(pre, tail, strict=True)]
    capacity = max(total) + max_new_tokens
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
    tokens = decode_tokens(
        _stepper(decoder, cache, mode), logits, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
        eos_id=eos_id,
    )
    return Generation(tokens, any(flags), p_lens[0], flags, p_lens)


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


__all__ = ["Generation", "generate_batch", "decode_tokens", "pick_tokens", "STEP_MODES"]

"""Token sampling on the device: greedy or top-k by the exponential race, and the decode loop
that feeds sampled tokens back to a step function with at most one host read per token."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


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

"""Augmented generation: plain / augmented / cascade (n samples) / saved latents agree."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import tiny_decoder

from cacheaug_engine.augment.coprocessor import Coprocessor
from cacheaug_engine.generation import augment, generate, load_latents, save_latents
from cacheaug_engine.models.cache import KVCache


def _cop(dec, placement="paper"):
    cop = Coprocessor(dec, 3, lora_rank=2, placement=placement, seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for ad in cop.adapters():
            ad.lora_b.copy_(0.05 * torch.randn(ad.lora_b.shape, generator=gen))
    return cop


def _greedy_reference(dec, embeds: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding by re-running a full causal pass over the embeddings each step."""
    out = []
    for _ in range(steps):
        logits = dec.prefill(inputs_embeds=embeds)[0][0, -1]
        nxt = int(logits.argmax())
        out.append(nxt)
        embeds = torch.cat([embeds, dec.embed(torch.tensor([[nxt]]))], 1)
    return out


@pytest.mark.parametrize("placement", ["paper", "early"])
def test_augmented_greedy_matches_full_recompute(placement):
    dec = tiny_decoder("llama")
    cop = _cop(dec, placement)
    prompt = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    g = generate(dec, prompt, coprocessor=cop, max_new_tokens=6)
    h = augment(dec, cop, prompt)
    cut = 8 if placement == "early" else 9
    with torch.no_grad():
        emb = torch.cat([dec.embed(prompt[:, :cut]), h.latents, dec.embed(prompt[:, cut:])], 1)
        assert g.tokens[0] == _greedy_reference(dec, emb, 6)
        plain = generate(dec, prompt, max_new_tokens=6)
        assert plain.tokens[0] == _greedy_reference(dec, dec.embed(prompt), 6)
    assert g.augmented and not plain.augmented


def test_cascade_samples_match_single_decode_and_share_cache():
    dec = tiny_decoder("gemma2")  # softcap + sliding window through cascade_decode
    cop = _cop(dec)
    prompt = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    one = generate(dec, prompt, coprocessor=cop, max_new_tokens=10)
    many = generate(dec, prompt, coprocessor=cop, max_new_tokens=10, num_samples=3)
    assert all(t == one.tokens[0] for t in many.tokens)
    sampled = generate(dec, prompt, coprocessor=cop, max_new_tokens=10, num_samples=4, temperature=1.0, seed=3)
    assert len(sampled.tokens) == 4 and all(len(t) == 10 for t in sampled.tokens)
    again = generate(dec, prompt, coprocessor=cop, max_new_tokens=10, num_samples=4, temperature=1.0, seed=3)
    assert sampled.tokens == again.tokens


def test_saved_latents_reuse(tmp_path):
    dec = tiny_decoder("llama")
    cop = _cop(dec, "early")
    prompt = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(4))
    h = augment(dec, cop, prompt)
    f = save_latents(tmp_path / "lat.safetensors", h, {"note": "x"})
    loaded = load_latents(f)
    assert loaded.placement == "early" and torch.equal(loaded.prompt_ids, prompt)
    a = generate(dec, prompt, coprocessor=cop, max_new_tokens=5)
    b = generate(dec, prompt, latents=loaded, max_new_tokens=5)
    assert a.tokens == b.tokens
    with pytest.raises(ValueError):
        generate(dec, prompt[:, :5], latents=load_latents(f), max_new_tokens=2)
    with pytest.raises(FileNotFoundError):
        load_latents(tmp_path / "missing.safetensors")


def test_one_token_prompt_early_placement():
    dec = tiny_decoder("qwen2")
    cop = _cop(dec, "early")
    prompt = torch.tensor([[5]])
    g = generate(dec, prompt, coprocessor=cop, max_new_tokens=3)
    # "early" with one token: the latents see an empty cache and go in before the prompt's only token
    c = dec.cfg
    empty = KVCache.empty(c.num_layers, 1, c.num_kv_heads, c.head_dim, 0, dtype=dec.dtype)
    with torch.no_grad():
        z = cop.latents_at(empty, torch.tensor([[1]]))[:, 0]
        want = _greedy_reference(dec, torch.cat([z, dec.embed(prompt)], 1), 3)
    assert g.tokens[0] == want and g.augmented
    assert want != generate(dec, prompt, max_new_tokens=3).tokens[0]  # the latents change the tokens here


def test_handle_reused_twice_gives_same_output():
    dec = tiny_decoder("llama")
    cop = _cop(dec)
    prompt = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(7))
    h = augment(dec, cop, prompt)
    a = generate(dec, prompt, latents=h, max_new_tokens=4)
    b = generate(dec, prompt, latents=h, max_new_tokens=4)
    assert a.tokens == b.tokens


@pytest.mark.parametrize("arch,placement", [("llama", "paper"), ("llama", "early"), ("gemma2", "early")])
def test_batched_generation_equals_one_prompt_generation_row_by_row(arch, placement):
    """Prompts of different lengths, augmented and plain rows mixed, decoded in one batch: every
    row equals generating that prompt alone (greedy), for the dynamic and the static step."""
    dec = tiny_decoder(arch)
    cop = _cop(dec, placement)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (n,), generator=gen) for n in (7, 1, 12, 4)]
    flags = [True, True, False, False] if placement == "early" else [True, False, True, False]
    single = [
        generate(dec, p.view(1, -1), coprocessor=cop if f else None, max_new_tokens=6).tokens[0]
        for p, f in zip(prompts, flags, strict=True)
    ]
    for step in ("dynamic", "static"):
        batch = generate(dec, prompts, coprocessor=cop, augmented=flags, max_new_tokens=6, step=step)
        assert batch.tokens == single, step
        assert batch.rows_augmented == flags and batch.prompt_lens == [7, 1, 12, 4]


def test_batched_generation_stops_rows_at_eos_and_samples_reproducibly():
    dec = tiny_decoder("llama")
    prompts = [[5, 6, 7], [9], [10, 11, 12, 13, 14]]
    free = generate(dec, prompts, max_new_tokens=8).tokens
    eos = free[1][2]  # a token row 1 produces third: row 1 stops there
    cut = generate(dec, prompts, max_new_tokens=8, eos_id=eos).tokens
    for full, short in zip(free, cut, strict=True):
        assert short == (full[: full.index(eos) + 1] if eos in full else full)
    a = generate(dec, prompts, max_new_tokens=8, temperature=1.0, top_k=20, seed=4).tokens
    assert a == generate(dec, prompts, max_new_tokens=8, temperature=1.0, top_k=20, seed=4).tokens
    assert all(len(t) == 8 for t in a)


def test_graph_step_needs_cuda():
    dec = tiny_decoder("llama")
    with pytest.raises(ValueError, match="step='graph'.*needs a CUDA device"):
        generate(dec, [[5, 6], [7]], max_new_tokens=2, step="graph")

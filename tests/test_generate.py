"""Augmented generation: plain / augmented / cascade (n samples) / saved latents agree."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import tiny_decoder

from cacheaug_engine.augment.coprocessor import Coprocessor
from cacheaug_engine.generate import augment, generate, load_latents, save_latents


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
    g = generate(dec, torch.tensor([[5]]), coprocessor=cop, max_new_tokens=3)
    assert len(g.tokens[0]) == 3


def test_handle_reused_twice_gives_same_output():
    dec = tiny_decoder("llama")
    cop = _cop(dec)
    prompt = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(7))
    h = augment(dec, cop, prompt)
    a = generate(dec, prompt, latents=h, max_new_tokens=4)
    b = generate(dec, prompt, latents=h, max_new_tokens=4)
    assert a.tokens == b.tokens

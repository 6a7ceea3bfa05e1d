"""--no-shift-tokens (CoprocessorConfig.shift_tokens False): the tokens after the latents keep their own
RoPE positions and the latents take the N_L positions before the block's first token row (clamped at 0).

The objective is checked against one plain causal pass per point with the position ids written out by
hand; init-from may switch the setting (it is not in the tensors' meaning) and records it; every
inference path that numbers positions the paper's way refuses such a coprocessor, before any work.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from control_oracle import block_start
from model_fixtures import tiny_decoder

from cacheaug_engine.augment.coprocessor import Coprocessor
from cacheaug_engine.augment.layout import block_layout
from cacheaug_engine.augment.objective import CacheAugmentationObjective

NA, NL = 3, 2
POS = torch.tensor([[1, 6, 11], [3, 8, 12]])  # p = 1: the paper block starts at 1 < N_L (clamped latents)


@pytest.fixture(scope="module")
def dec():
    return tiny_decoder("llama", dtype=torch.float64)


def _oracle_ce(dec, ids_row, p, latents, placement):
    """CE [N_A] from one causal pass over [x[:start] ; latents ; x[start : p+N_A-1]]; the prefix and the
    token rows at their own positions, the latents at start-N_L .. start-1 clamped at 0."""
    start = block_start(p, placement)
    row = ids_row.view(1, -1)
    parts = [dec.embed(row[:, :start]), latents.unsqueeze(0).to(dec.dtype), dec.embed(row[:, start : p + NA - 1])]
    seq = torch.cat(parts, 1)
    pos = list(range(start)) + [max(start - NL + i, 0) for i in range(NL)] + list(range(start, p + NA - 1))
    logits = dec.prefill(inputs_embeds=seq, positions=torch.tensor([pos]))[0][0, -NA:]
    return F.cross_entropy(logits.double(), ids_row[p : p + NA], reduction="none")


@pytest.mark.parametrize("placement", ["paper", "early"])
def test_objective_matches_a_plain_pass_with_unshifted_positions(dec, placement):
    pause = Coprocessor(dec, NL, latents="pause", placement=placement, shift_tokens=False, seed=2)
    with torch.no_grad():
        pause.soft_tokens.add_(torch.randn(pause.soft_tokens.shape, generator=torch.Generator().manual_seed(1)))
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    out = CacheAugmentationObjective(dec, pause, ahead=NA)(ids, POS)
    z = pause.soft_tokens.detach().double() * pause.scale().detach().double().unsqueeze(-1)
    want = torch.stack([torch.stack([_oracle_ce(dec, ids[b], p, z, placement) for p in row])
                        for b, row in enumerate(POS.tolist())])
    torch.testing.assert_close(out.ce_aug.double(), want, rtol=1e-6, atol=1e-7)
    shifted = CacheAugmentationObjective(dec, Coprocessor(dec, NL, latents="pause", placement=placement, seed=2),
                                         ahead=NA)(ids, POS)
    assert float((shifted.ce_aug - out.ce_aug).abs().max()) > 1e-4  # the setting reaches the positions


def test_layout_positions():
    lay = block_layout(torch.tensor([[5]]), 3, 2, "early", shift_tokens=False)
    assert lay.dec_pos.tolist() == [[1, 2, 3, 4, 5]]  # latents at 1..3, x[4], x[5] at their own 4, 5
    assert block_layout(torch.tensor([[5]]), 3, 2, "early").dec_pos.tolist() == [[4, 5, 6, 7, 8]]
    assert block_layout(torch.tensor([[1]]), 3, 2, "paper", shift_tokens=False).dec_pos.tolist() == [[0, 0, 0, 1]]


def test_inference_paths_refuse_an_unshifted_coprocessor(dec):
    from cacheaug_engine.generation.augmented_lm import AugmentedLM
    from cacheaug_engine.generation.generate import generate
    from cacheaug_engine.generation.latents import augment
    from cacheaug_engine.integrations.vllm_prompts import PromptAugmenter

    cop = Coprocessor(dec, NL, lora_rank=2, placement="early", shift_tokens=False)
    for call in (lambda: AugmentedLM(dec, "coprocessor", cop),
                 lambda: generate(dec, [[5, 6, 7]], coprocessor=cop, max_new_tokens=2),
                 lambda: augment(dec, cop, torch.tensor([[5, 6, 7]])),
                 lambda: PromptAugmenter(dec, cop)):
        with pytest.raises(ValueError, match="--no-shift-tokens"):
            call()


def test_config_round_trip_and_old_configs_are_shifted():
    from cacheaug_engine.augment.coprocessor import CoprocessorConfig

    cfg = CoprocessorConfig(num_latents=2, shift_tokens=False)
    assert CoprocessorConfig.from_dict(cfg.to_dict()).shift_tokens is False
    old = cfg.to_dict()
    del old["shift_tokens"]  # a checkpoint written before the setting existed
    assert CoprocessorConfig.from_dict(old).shift_tokens is True

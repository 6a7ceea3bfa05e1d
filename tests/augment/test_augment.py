"""Coprocessor, layout and the multi-position objective vs a naive per-position loop."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import tiny_decoder

from cacheaug_engine.augment.coprocessor import Coprocessor
from cacheaug_engine.augment.layout import block_layout, check_positions, sample_positions, stride_positions
from cacheaug_engine.augment.lora import LoRALinear
from cacheaug_engine.augment.objective import CacheAugmentationObjective
from cacheaug_engine.models.cache import KVCache

NL, NA = 3, 4


def _randomise_lora(cop: Coprocessor, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ad in cop.adapters():
            ad.lora_b.copy_(0.05 * torch.randn(ad.lora_b.shape, generator=gen))


@torch.no_grad()
def _prefill(decoder, ids: torch.Tensor) -> KVCache:
    if ids.shape[1] == 0:
        c = decoder.cfg
        return KVCache.empty(c.num_layers, ids.shape[0], c.num_kv_heads, c.head_dim, 0)
    return decoder.prefill(ids)[1]


class _ReadOnlyCache(KVCache):
    """A cache whose writes are dropped: the coprocessor only reads the decoder's cache."""

    def write(self, layer, k_new, v_new):  # noqa: D102
        return None


def naive_loss(decoder, cop: Coprocessor, ids: torch.Tensor, positions: torch.Tensor, ahead: int) -> torch.Tensor:
    """Per position separately: prefill x[:p] (x[:p-1] when "early"), run the coprocessor over that
    cache (Decoder.extend with the soft tokens), then one ordinary causal pass of the decoder over
    [x[:p] ; latents ; x[p:p+N_A-1]] scoring x[p:p+N_A]."""
    early = cop.placement == "early"
    ces = []
    for b in range(ids.shape[0]):
        for p in positions[b].tolist():
            start = p - 1 if early else p
            cache = _prefill(decoder, ids[b : b + 1, :start])
            ro = _ReadOnlyCache(cache.k, cache.v, cache.lens, cache.max_len)
            _, h = cop.model.extend(inputs_embeds=cop.soft_tokens.unsqueeze(0), cache=ro, return_hidden=True)
            z = h * cop.scale().view(1, -1, 1)
            seq = torch.cat(
                [
                    decoder.embed(ids[b : b + 1, :start]),
                    z,
                    decoder.embed(ids[b : b + 1, start : p + ahead - 1]),
                ],
                1,
            )
            logits = decoder.prefill(inputs_embeds=seq)[0][0, -ahead:]
            ces.append(torch.nn.functional.cross_entropy(logits, ids[b, p : p + ahead], reduction="none"))
    return torch.stack(ces).mean()


@torch.no_grad()
def cached_decode_ce(decoder, cop: Coprocessor, ids: torch.Tensor, p: int, ahead: int) -> torch.Tensor:
    """Inference path: prefill, latents appended with extend, then decode_step token by token."""
    early = cop.placement == "early"
    start = p - 1 if early else p
    cache = _prefill(decoder, ids[:, :start])
    z = cop.latents_at(cache, torch.tensor([[p]]), ahead)[:, 0]
    lat_logits = decoder.extend(inputs_embeds=z, cache=cache)
    logits = [] if early else [lat_logits[0, -1]]
    for j in range(start, p + ahead - 1):
        logits.append(decoder.decode_step(ids[:, j], cache)[0])
    return torch.nn.functional.cross_entropy(torch.stack(logits), ids[0, p : p + ahead], reduction="none")


def _grads(cop: Coprocessor) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in cop.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "arch,lora,placement",
    [
        ("llama", 4, "paper"),
        ("llama", None, "paper"),
        ("llama", 4, "early"),
        ("gemma2", 4, "paper"),
        ("qwen2", None, "early"),
    ],
)
def test_objective_matches_naive_loop(arch, lora, placement):
    torch.manual_seed(0)
    dec = tiny_decoder(arch)
    cop = Coprocessor(dec, NL, lora_rank=lora, placement=placement, scale_mode="learned", seed=3)
    if lora:
        _randomise_lora(cop)
    obj = CacheAugmentationObjective(dec, cop, ahead=NA)
    ids = torch.randint(3, 256, (2, 20), generator=torch.Generator().manual_seed(5))
    positions = torch.tensor([[1, 6, 9, 16], [2, 3, 11, 15]])
    out = obj(ids, positions)
    out.loss.backward()
    g_obj = _grads(cop)
    cop.zero_grad(set_to_none=True)
    ref = naive_loss(dec, cop, ids, positions, NA)
    ref.backward()
    g_ref = _grads(cop)
    assert torch.allclose(out.loss, ref, atol=1e-5, rtol=1e-5), (out.loss.item(), ref.item())
    assert g_obj.keys() == g_ref.keys() and len(g_obj) > 0
    for name in g_obj:
        assert torch.allclose(g_obj[name], g_ref[name], atol=1e-5, rtol=1e-4), name
    # baseline = the decoder's own next-token CE for the same targets
    with torch.no_grad():
        logits = dec(ids)
    for b in range(2):
        for k, p in enumerate(positions[b].tolist()):
            want = torch.nn.functional.cross_entropy(
                logits[b, p - 1 : p + NA - 1], ids[b, p : p + NA], reduction="none"
            )
            assert torch.allclose(out.ce_base[b, k], want, atol=1e-5)
    # the KV-cache inference path (extend + decode_step) gives the same per-target CE
    for k, p in enumerate(positions[1].tolist()):
        got = cached_decode_ce(dec, cop, ids[1:2], p, NA)
        assert torch.allclose(got, out.ce_aug[1, k], atol=1e-4), (p, got, out.ce_aug[1, k])


def test_lora_shares_weights_and_leaves_decoder_frozen():
    dec = tiny_decoder("llama")
    before = {n: p.clone() for n, p in dec.state_dict().items()}
    cop = Coprocessor(dec, NL, lora_rank=2)
    q = cop.model.layers[0].attn.q_proj
    assert isinstance(q, LoRALinear) and q.base.weight is dec.layers[0].attn.q_proj.weight
    assert not isinstance(dec.layers[0].attn.q_proj, LoRALinear)
    trainable = [p for p in cop.parameters() if p.requires_grad]
    assert all(not p.requires_grad for p in dec.parameters())
    obj = CacheAugmentationObjective(dec, cop, ahead=NA, num_positions=3)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, 256, (2, 16))
    for _ in range(2):
        obj(ids).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in dec.state_dict().items():
        assert torch.equal(p, before[n]), n


def test_full_copy_does_not_alias_decoder():
    dec = tiny_decoder("llama")
    cop = Coprocessor(dec, NL, lora_rank=None)
    assert cop.model.layers[0].attn.q_proj.weight is not dec.layers[0].attn.q_proj.weight
    assert cop.model.layers[0].attn.q_proj.weight.requires_grad
    assert cop.model.embed_tokens.weight is dec.embed_tokens.weight


def test_training_with_objective_lowers_loss():
    torch.manual_seed(0)
    dec = tiny_decoder("llama")
    cop = Coprocessor(dec, 2, lora_rank=4, seed=0)
    obj = CacheAugmentationObjective(dec, cop, ahead=3, num_positions=4)
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=3e-2)
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    pos = stride_positions(4, 24, 3, stride=5)
    first = obj(ids, pos).loss.item()
    for _ in range(15):
        loss = obj(ids, pos).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert obj(ids, pos).loss.item() < first - 0.1


def test_trainable_state_roundtrip():
    dec = tiny_decoder("llama")
    a = Coprocessor(dec, NL, lora_rank=2, seed=0)
    _randomise_lora(a)
    b = Coprocessor(dec, NL, lora_rank=2, seed=9)
    b.load_trainable_state(a.trainable_state())
    for k, v in a.trainable_state().items():
        assert torch.equal(v, b.trainable_state()[k])
    with pytest.raises(ValueError):
        Coprocessor(dec, NL + 1, lora_rank=2).load_trainable_state(a.trainable_state())


def test_positions_and_layout():
    gen = torch.Generator().manual_seed(0)
    pos = sample_positions(3, 32, 8, 4, generator=gen)
    assert pos.shape == (3, 8) and int(pos.min()) >= 1 and int(pos.max()) <= 28
    assert bool((pos[:, 1:] > pos[:, :-1]).all())
    st = stride_positions(2, 32, 4, stride=8)
    assert st[0].tolist() == [1, 9, 17, 25]
    with pytest.raises(ValueError):
        check_positions(torch.tensor([[0, 3]]), 32, 4)
    with pytest.raises(ValueError):
        check_positions(torch.tensor([[5, 3]]), 32, 4)
    with pytest.raises(ValueError, match="strictly increasing"):  # a repeated point would be scored twice
        check_positions(torch.tensor([[3, 7], [5, 5]]), 32, 4)
    assert check_positions(torch.tensor([[1, 28]], dtype=torch.int32), 32, 4).dtype == torch.long  # both ends valid
    with pytest.raises(ValueError, match=r"positions must lie in \[1, 28\]"):
        check_positions(torch.tensor([[1, 29]]), 32, 4)
    with pytest.raises(ValueError):
        sample_positions(1, 8, 10, 4)
    lay = block_layout(torch.tensor([[4, 10]]), 2, 3, "paper")
    assert lay.block_len == 4 and lay.prefix_lens.tolist() == [[4, 10]]
    assert lay.dec_pos.tolist() == [[4, 5, 6, 7, 10, 11, 12, 13]]
    assert lay.token_idx.tolist() == [[[4, 5], [10, 11]]]
    assert lay.target_idx.tolist() == [[[4, 5, 6], [10, 11, 12]]]
    early = block_layout(torch.tensor([[4]]), 2, 3, "early")
    assert early.block_len == 5 and early.prefix_lens.tolist() == [[3]]
    assert early.token_idx.tolist() == [[[3, 4, 5]]] and early.copro_pos.tolist() == [[3, 4]]

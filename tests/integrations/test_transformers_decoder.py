"""TransformersDecoder: a transformers causal LM driven through the engine's ops.

* llama, qwen2, gemma2: equal to our native Decoder on the same weights (prefill logits,
  forward_blocks, the objective's loss and coprocessor gradients), fp32, within 2x the error
  the native Decoder itself has against a float64 run of itself;
* qwen3, mistral (sliding window), gemma3, phi3, olmo2: forward_blocks equals running each
  block through the HF model itself over a cache truncated to p_k;
* wrap-time errors name the feature.
"""

from __future__ import annotations

import pytest
import torch
from model_fixtures import ARCHS, hf_config_kwargs, tiny_config

from cacheaug_engine.augment import CacheAugmentationObjective, Coprocessor
from cacheaug_engine.models import Decoder
from cacheaug_engine.models.hf import hf_to_ours

transformers = pytest.importorskip("transformers")
from cacheaug_engine.models.transformers_decoder import TransformersDecoder  # noqa: E402

HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma2": "Gemma2ForCausalLM"}
OTHER = {  # model_type -> extra config: tiny (2 layers, hidden 64), windows small enough to bite
    "qwen3": {}, "mistral": {"sliding_window": 5}, "gemma3_text": {"sliding_window": 5}, "phi3": {}, "olmo2": {},
}


def _randomise(model, zero_norm: bool) -> None:
    with torch.no_grad():  # every weight random, norms too, so each one matters
        for name, p in model.named_parameters():
            base = 0.0 if (zero_norm or "norm" not in name) else 1.0
            p.copy_(base + (0.1 if "norm" in name else 0.05) * torch.randn_like(p))


def native_pair(arch: str, seed: int = 0):
    """(hf model, TransformersDecoder, native Decoder fp32, native Decoder fp64) on the same weights."""
    cfg = tiny_config(arch)
    hf_cls = getattr(transformers, HF_CLASSES[arch])
    torch.manual_seed(seed)
    hf = hf_cls(hf_cls.config_class(**hf_config_kwargs(cfg))).eval()
    _randomise(hf, zero_norm=arch == "gemma2")
    state = {hf_to_ours(k, cfg): v for k, v in hf.state_dict().items()}
    state = {k: v for k, v in state.items() if k is not None}
    nat = Decoder.from_weights(cfg, {k: v.clone() for k, v in state.items()})
    nat64 = Decoder.from_weights(cfg, {k: v.double() for k, v in state.items()})
    return hf, TransformersDecoder(hf), nat, nat64


def other_model(model_type: str, seed: int = 0):
    extra = OTHER[model_type]
    cfg = transformers.AutoConfig.for_model(
        model_type, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        **extra,
    )
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    _randomise(hf, zero_norm=model_type.startswith("gemma"))
    return hf


def _ids(b: int, t: int, vocab: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def _close(got: torch.Tensor, nat: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """|got - ref| <= 2 |nat - ref| (+ a few fp32 ulps of the largest value)."""
    err = (got.double() - ref.double()).abs().max().item()
    own = (nat.double() - ref.double()).abs().max().item()
    floor = 8 * torch.finfo(torch.float32).eps * ref.abs().max().item()  # a few ulps of the largest value
    print(f"{what}: err {err:.2e}, native's own {own:.2e}")
    assert err <= 2 * own + floor, f"{what}: {err:.3e} > 2 x {own:.3e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_equals_native(arch: str) -> None:
    hf, td, nat, nat64 = native_pair(arch)
    assert td.cfg.num_layers == nat.cfg.num_layers and not any(p.requires_grad for p in hf.parameters())
    ids = _ids(2, 20, td.cfg.vocab_size)  # 20 > gemma2's window 8
    with torch.no_grad():
        got, cache = td.prefill(ids)[:2]
        want, nat_cache = nat.prefill(ids)[:2]
        ref, cache64 = nat64.prefill(ids)[:2]
    _close(got, want, ref, f"{arch} prefill logits")
    for i in range(td.cfg.num_layers):
        _close(cache.k[i], nat_cache.k[i], cache64.k[i], f"{arch} cache k[{i}]")
    # forward_blocks: 3 blocks of 4 rows at different prefixes (one 0, one the whole cache)
    p = torch.tensor([[0, 7, 20], [3, 12, 16]])
    x = torch.randn(2, 12, td.cfg.hidden_size, generator=torch.Generator().manual_seed(1)) * 0.5
    pos = (p.repeat_interleave(4, 1) + torch.arange(4).repeat(3))
    with torch.no_grad():
        got = td.forward_blocks(x, pos, cache, p, 4)
        want = nat.forward_blocks(x, pos, nat_cache, p, 4)
        ref = nat64.forward_blocks(x.double(), pos, cache64, p, 4)
    _close(got, want, ref, f"{arch} forward_blocks")


def _objective_grads(decoder, seed: int = 0):
    copro = Coprocessor(decoder, 4, lora_rank=4, seed=seed)
    with torch.no_grad():  # lora_b starts at zero: make every trainable tensor matter
        g = torch.Generator().manual_seed(5)
        for prm in copro.parameters():
            if prm.requires_grad:
                prm.add_(0.05 * torch.randn(prm.shape, generator=g).to(prm.dtype))
    obj = CacheAugmentationObjective(decoder, copro, ahead=3)
    ids = _ids(2, 24, decoder.cfg.vocab_size, seed=9)
    out = obj(ids, positions=torch.tensor([[2, 9, 15], [5, 11, 20]]))
    out.loss.backward()
    return out.loss.detach(), [prm.grad for prm in copro.parameters() if prm.requires_grad]


@pytest.mark.parametrize("arch", ARCHS)
def test_objective_and_gradients_equal_native(arch: str) -> None:
    _, td, nat, nat64 = native_pair(arch)
    loss, grads = _objective_grads(td)
    nloss, ngrads = _objective_grads(nat)
    rloss, rgrads = _objective_grads(nat64)
    assert len(grads) == len(ngrads) == len(rgrads) > 4
    _close(loss, nloss, rloss, f"{arch} loss")
    for i, (g, ng, rg) in enumerate(zip(grads, ngrads, rgrads, strict=True)):
        assert g.shape == ng.shape
        _close(g, ng, rg, f"{arch} grad[{i}]")


@pytest.mark.parametrize("model_type", sorted(OTHER))
def test_blocks_equal_hf_over_truncated_cache(model_type: str) -> None:
    hf = other_model(model_type)
    td = TransformersDecoder(hf)
    b, t, s = 2, 14, 4
    ids = _ids(b, t, 128)
    p = torch.tensor([[0, 6, 14], [2, 9, 11]])
    x = torch.randn(b, 3 * s, 64, generator=torch.Generator().manual_seed(1))
    pos = p.repeat_interleave(s, 1) + torch.arange(s).repeat(3)
    with torch.no_grad():
        cache = td.prefill(ids)[1]
        got = td.forward_blocks(x, pos, cache, p, s).view(b, 3, s, -1)
        for r in range(b):
            for k in range(3):
                pk = int(p[r, k])
                past = None
                if pk:
                    past = hf(ids[r : r + 1, :pk], use_cache=True).past_key_values
                blk = slice(k * s, (k + 1) * s)
                want = hf(inputs_embeds=x[r : r + 1, blk], position_ids=pos[r : r + 1, blk], cache=past,
                          use_cache=True).logits[0].float()
                err = (got[r, k] - want).abs().max().item()
                assert err <= 1e-5 * (1 + want.abs().max().item()), f"{model_type} row {r} block {k}: {err:.2e}"


def test_wrap_errors_name_the_feature() -> None:
    with pytest.raises(TypeError, match="PreTrainedModel"):
        TransformersDecoder(torch.nn.Linear(2, 2))
    from cacheaug_engine.models.transformers_attention import AttentionPass, attention

    class Mod(torch.nn.Module):
        layer_idx = 0

    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match="attention sinks"):
        attention(Mod(), q, q, q, None, s_aux=torch.zeros(2), cacheaug_pass=AttentionPass(lambda *a: q))
    with pytest.raises(RuntimeError, match="only inside"):
        attention(Mod(), q, q, q, None)


def test_model_left_usable_and_frozen() -> None:
    hf = other_model("qwen3")
    ids = _ids(1, 6, 128)
    before = hf(ids).logits
    TransformersDecoder(hf)
    assert hf.config._attn_implementation != "cacheaug"
    assert torch.equal(hf(ids).logits, before) and not any(p.requires_grad for p in hf.parameters())


def test_head_transform_is_what_the_model_applies() -> None:
    """A config attribute the model ignores (gpt2 with a final softcap) is not applied; a transform the
    engine cannot reproduce (a forward that rescales the logits) is refused at wrap time."""
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, final_logit_softcapping=0.5)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    _randomise(hf, zero_norm=False)
    ids = _ids(1, 9, 128)
    td = TransformersDecoder(hf)
    assert td.cfg.final_softcap is None
    assert torch.allclose(td(ids), hf(ids).logits, atol=1e-5)

    class Rescaled(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    m = Rescaled(transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()
    _randomise(m, zero_norm=False)
    with pytest.raises(ValueError, match="logits differ from the model's own"):
        TransformersDecoder(m)


def test_bf16_model() -> None:
    hf = other_model("qwen3").to(torch.bfloat16)
    td = TransformersDecoder(hf)
    ids = _ids(2, 9, 128)
    logits, cache = td.prefill(ids)
    assert td.dtype == cache.dtype == torch.bfloat16
    with torch.no_grad():
        want = hf(ids).logits.float()
    assert (logits - want).abs().max() <= 2e-2 * (1 + want.abs().max())

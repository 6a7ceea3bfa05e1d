"""augmented_generate_inputs + the user's own hf_model.generate == our augmented generation
(greedy, token for token, left-padded batches), and load_decoder's implementation choice."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cacheaug_engine.augment import Coprocessor  # noqa: E402
from cacheaug_engine.generation import generate  # noqa: E402
from cacheaug_engine.integrations.transformers import augmented_generate_inputs  # noqa: E402
from cacheaug_engine.models import Decoder, TransformersDecoder, load_decoder  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MODELS = {"llama": {}, "mistral": {"sliding_window": 5}, "qwen3": {}}


def _model(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(model_type, **COMMON, **MODELS.get(model_type, {}))
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # larger weights than the init: greedy tokens that depend on the inputs
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def _left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    w = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), w, dtype=torch.long)
    mask = torch.zeros(len(rows), w, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, w - len(r):] = r
        mask[i, w - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("placement", ["paper", "early"])
@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_generate_continues_from_augmented_cache(model_type: str, placement: str) -> None:
    hf = _model(model_type)
    dec = TransformersDecoder(hf)
    copro = Coprocessor(dec, 3, lora_rank=2, placement=placement, seed=1)
    with torch.no_grad():
        for p in copro.parameters():
            p.add_(0.1 * torch.randn_like(p))
    rows = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 4, 6)]
    ours = generate(dec, rows, coprocessor=copro, max_new_tokens=8).tokens
    plain = generate(dec, rows, max_new_tokens=8).tokens
    assert ours != plain, "the latents change nothing: the comparison could not fail"
    kw = augmented_generate_inputs(dec, copro, *_left_padded(rows))
    n = kw["input_ids"].shape[1]
    out = hf.generate(**kw, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out[:, n:].tolist() == ours


def test_generate_inputs_reject_bad_input() -> None:
    dec = TransformersDecoder(_model("llama"))
    copro = Coprocessor(dec, 2, lora_rank=2)
    with pytest.raises(ValueError, match="input_ids"):
        augmented_generate_inputs(dec, copro, torch.zeros(3))
    with pytest.raises(ValueError, match="attention_mask"):
        augmented_generate_inputs(dec, copro, torch.ones(1, 4, dtype=torch.long), torch.tensor([[1, 0, 1, 0]]))


def test_load_decoder_picks_the_implementation(tmp_path) -> None:
    _model("qwen3").save_pretrained(tmp_path / "qwen3")
    _model("llama").save_pretrained(tmp_path / "llama")
    assert isinstance(load_decoder(tmp_path / "qwen3"), TransformersDecoder)
    assert isinstance(load_decoder(tmp_path / "llama"), Decoder)
    llama_hf = load_decoder(tmp_path / "llama", impl="transformers")
    assert isinstance(llama_hf, TransformersDecoder)
    ids = torch.randint(0, 128, (1, 7))
    assert torch.allclose(llama_hf(ids), load_decoder(tmp_path / "llama")(ids), atol=1e-5)
    with pytest.raises(ValueError, match="impl"):
        load_decoder(tmp_path / "llama", impl="hf")
    with pytest.raises(ValueError, match="unsupported model_type"):
        load_decoder(tmp_path / "qwen3", impl="native")

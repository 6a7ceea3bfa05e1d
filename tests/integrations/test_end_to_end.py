"""Every listed transformers architecture end to end through TransformersDecoder: train a LoRA
coprocessor 3 steps, evaluate it (eval.evaluator.evaluate_controls), generate with it (ours and the model's own
generate from augmented_generate_inputs, equal token for token)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cacheaug_engine.augment import CacheAugmentationObjective, Coprocessor  # noqa: E402
from cacheaug_engine.eval.evaluator import evaluate_controls  # noqa: E402
from cacheaug_engine.generation import generate  # noqa: E402
from cacheaug_engine.integrations.transformers import augmented_generate_inputs  # noqa: E402
from cacheaug_engine.models import TransformersDecoder  # noqa: E402

ARCHS = {  # model_type -> extra config
    "llama": {}, "qwen2": {}, "gemma2": {"sliding_window": 6}, "qwen3": {}, "mistral": {"sliding_window": 6},
    "gemma3_text": {"sliding_window": 6}, "phi3": {}, "olmo2": {}, "smollm3": {}, "granite": {},
}
V = 128


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_train_eval_generate(model_type: str) -> None:
    cfg = transformers.AutoConfig.for_model(
        model_type, vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, **ARCHS[model_type],
    )
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    dec = TransformersDecoder(hf)
    copro = Coprocessor(dec, 3, lora_rank=2, seed=0)
    assert copro.adapters(), "no LoRA adapter found"
    obj = CacheAugmentationObjective(dec, copro, ahead=3, num_positions=2)
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-2)
    data = torch.randint(3, V, (6, 20), generator=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in copro.parameters() if p.requires_grad]
    for step in range(3):
        out = obj(data[2 * step : 2 * step + 2])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(out.loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, (p for p in copro.parameters() if p.requires_grad),
                                                     strict=True))
    res = evaluate_controls(obj, data[:2], batch_size=2)
    assert res["methods"] and all(torch.isfinite(torch.tensor(res["ce"][m])).all() for m in res["methods"])
    assert torch.tensor(res["ce"][res["methods"][0]]).shape == (2, 3)
    rows = [data[0, :9], data[1, :5]]
    ours = generate(dec, rows, coprocessor=copro, max_new_tokens=5).tokens
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 9 - len(r):] = r
        mask[i, 9 - len(r):] = 1
    kw = augmented_generate_inputs(dec, copro, ids, mask)
    got = hf.generate(**kw, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert got[:, kw["input_ids"].shape[1]:].tolist() == ours

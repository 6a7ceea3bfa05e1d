"""GGUF loader on tiny files written here in llama.cpp's layout (fast; no 98 MB model needed).

A tiny random HF Llama is written as GGUF the way llama.cpp's converter does it (names,
Q/K row permutation for its interleaved RoPE, F32 norms) with F32, F16 or Q8_0 matrices,
then read back through load_decoder and compared with the HF original and with
transformers' own GGUF reader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_fixtures import permute_llama as _permute
from gguf_fixtures import write_llama_gguf
from model_fixtures import hf_config_kwargs, tiny_config

from cacheaug_engine.models import load_decoder, load_tokenizer
from cacheaug_engine.models.gguf_loader import unpermute_qk

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

@pytest.fixture(scope="module")
def hf_llama():
    cfg = tiny_config("llama")
    kw = {**hf_config_kwargs(cfg), "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    hc = transformers.LlamaConfig(**kw)
    torch.manual_seed(5)
    model = transformers.LlamaForCausalLM(hc).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.05 * torch.randn_like(p) + (1.0 if "norm" in name else 0.0))
    return model


def test_unpermute_inverts_llama_cpp_permute() -> None:
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    back = unpermute_qk(torch.from_numpy(_permute(w, 3)), 3)
    assert torch.equal(back, torch.from_numpy(w))


def test_f32_gguf_equals_hf_model(hf_llama, tmp_path: Path) -> None:
    path = tmp_path / "tiny-f32.gguf"
    write_llama_gguf(hf_llama, path, gguf.GGMLQuantizationType.F32)
    m = load_decoder(path)
    assert m.cfg.tie_word_embeddings and m.cfg.num_layers == 2 and m.cfg.num_kv_heads == 2
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf_llama(ids).logits
    assert (m(ids) - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
def test_quantized_gguf_matches_transformers_gguf(hf_llama, tmp_path: Path, qtype: str, monkeypatch) -> None:
    pytest.importorskip("accelerate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / f"tiny-{qtype}.gguf"
    write_llama_gguf(hf_llama, path, getattr(gguf.GGMLQuantizationType, qtype))
    m = load_decoder(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, orig = hf(ids).logits, hf_llama(ids).logits
    assert (m(ids) - ref).abs().max() <= 1e-4
    assert (m(ids) - orig).abs().max() < 0.05  # quantization error only


def test_tiny_gguf_tokenizer_bytes(hf_llama, tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(hf_llama, path, gguf.GGMLQuantizationType.F32)
    tok = load_tokenizer(path)
    text = "ab 12 ba"
    ids = tok.encode(text).ids
    assert ids == [255, 32, 49, 50, 32, 98, 97]  # "ab" merged, digits split, "b a" not merged
    assert tok.decode(ids) == text


@pytest.mark.reliability
def test_nan_in_a_gguf_tensor_is_refused_naming_it(hf_llama, tmp_path: Path) -> None:
    """Issue 26: a GGUF whose payload holds a NaN loads only with check_finite=False."""
    name = "model.layers.1.mlp.down_proj.weight"
    with torch.no_grad():
        saved = hf_llama.get_parameter(name).clone()
        hf_llama.get_parameter(name)[0, 0] = float("nan")
    try:
        path = tmp_path / "tiny-nan.gguf"
        write_llama_gguf(hf_llama, path, gguf.GGMLQuantizationType.F32)
    finally:
        with torch.no_grad():
            hf_llama.get_parameter(name).copy_(saved)
    with pytest.raises(ValueError) as info:
        load_decoder(path)
    assert str(info.value).startswith(f"{path}: tensor 'layers.1.mlp.down_proj.weight' holds 1 NaN/Inf"), info.value
    assert load_decoder(path, check_finite=False).cfg.num_layers == 2

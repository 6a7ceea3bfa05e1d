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
from model_fixtures import hf_config_kwargs, tiny_config

from cacheaug_engine.models import load_decoder, load_tokenizer
from cacheaug_engine.models.gguf_loader import unpermute_qk

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute``."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_tokens(n: int) -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelled = bytes_to_unicode()
    byte_tokens = [spelled[b] for b in range(255)]  # token i = byte i ("a" = 97), byte 255 replaced by "ab"
    return byte_tokens + ["ab"] + [f"<extra_{i}>" for i in range(n - 256)]


def write_llama_gguf(hf_model, path: Path, qtype) -> None:
    """Write a HF LlamaForCausalLM the way llama.cpp's converter would (matrices in ``qtype``)."""
    c = hf_model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(_byte_tokens(c.vocab_size))
    w.add_token_types([1] * c.vocab_size)
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, t in hf_model.state_dict().items():
        a = t.float().numpy()
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, idx, rest = name.split(".", 3)
            mod = rest.rsplit(".", 1)[0]
            gname = f"blk.{idx}.{_GGUF_NAMES[mod]}.weight"
            if mod == "self_attn.q_proj":
                a = _permute(a, c.num_attention_heads)
            elif mod == "self_attn.k_proj":
                a = _permute(a, c.num_key_value_heads)
        if a.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, np.ascontiguousarray(a, dtype=np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gname, a.astype(np.float16))
        else:
            q = gguf.quants.quantize(a, qtype)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


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

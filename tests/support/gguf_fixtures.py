"""Tiny GGUF files written the way llama.cpp's converter writes them (tests of the GGUF loader and of
``cacheaug export-hf``): a HF Llama's weights under llama.cpp's names, Q/K rows permuted for its
interleaved RoPE, F32 norms, a 256-token byte-level vocabulary ("ab" merged)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def permute_llama(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute``."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_tokens(n: int) -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelled = bytes_to_unicode()
    byte_tokens = [spelled[b] for b in range(255)]  # token i = byte i ("a" = 97), byte 255 replaced by "ab"
    return byte_tokens + ["ab"] + [f"<extra_{i}>" for i in range(n - 256)]


def write_llama_gguf(hf_model, path: Path, qtype) -> None:
    """Write a HF LlamaForCausalLM the way llama.cpp's converter would (matrices in ``qtype``)."""
    import gguf

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
                a = permute_llama(a, c.num_attention_heads)
            elif mod == "self_attn.k_proj":
                a = permute_llama(a, c.num_key_value_heads)
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


def tiny_hf_llama(seed: int = 5):
    """A random tiny HF LlamaForCausalLM (``model_fixtures.tiny_config("llama")`` with default RoPE), fp32."""
    import torch
    import transformers
    from model_fixtures import hf_config_kwargs, tiny_config

    kw = {**hf_config_kwargs(tiny_config("llama")), "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.05 * torch.randn_like(p) + (1.0 if "norm" in name else 0.0))
    return model

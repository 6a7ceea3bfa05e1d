"""Tiny decoder configs for tests (importable by every test module).

    from model_fixtures import tiny_config, tiny_decoder
    model = tiny_decoder("gemma2")          # random frozen Decoder, fp32, seed 0

Archs: "llama" (SmolLM2-like, tied, Llama-3 RoPE scaling), "qwen2" (q/k/v bias, untied),
"gemma2" (softcaps, sliding window 8 on even layers, post-norms, GeGLU, sqrt(d) scale).
head_dim is 64 so the fused kernels' head sizes apply.
"""

from __future__ import annotations

from typing import Any

import torch

from cacheaug_engine.models import Decoder, DecoderConfig

ARCHS = ("llama", "qwen2", "gemma2")
_HF_LAYER_TYPES = {"full": "full_attention", "sliding": "sliding_attention"}


def tiny_config(arch: str) -> DecoderConfig:
    """A 2- or 4-layer config of ``arch`` with d=128, 4 query / 2 KV heads of 64, vocab 256."""
    common: dict[str, Any] = dict(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2, head_dim=64,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
    )
    if arch == "llama":
        return DecoderConfig(
            arch="llama", num_layers=2, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            **common,
        )
    if arch == "qwen2":
        return DecoderConfig(
            arch="qwen2", num_layers=2, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
            qkv_bias=True, **common,
        )
    if arch == "gemma2":
        return DecoderConfig(
            arch="gemma2", num_layers=4, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
            hidden_act="gelu_tanh", norm_offset=1.0, embed_scale=True, post_norms=True, attn_softcap=5.0,
            final_softcap=3.0, query_pre_attn_scalar=48.0, sliding_window=8,
            layer_types=("sliding", "full", "sliding", "full"), **common,
        )
    raise ValueError(f"arch: expected one of {ARCHS}, got {arch!r}")


def tiny_decoder(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Decoder:
    """A random frozen Decoder of ``tiny_config(arch)``."""
    return Decoder.from_config(tiny_config(arch), dtype=dtype, seed=seed)


def hf_config_kwargs(cfg: DecoderConfig) -> dict[str, Any]:
    """The transformers config kwargs (LlamaConfig / Qwen2Config / Gemma2Config) equal to ``cfg``."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    kw: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters=rope, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
    )
    if cfg.arch == "gemma2":
        kw.update(
            hidden_activation="gelu_pytorch_tanh", attn_logit_softcapping=cfg.attn_softcap,
            final_logit_softcapping=cfg.final_softcap, query_pre_attn_scalar=int(cfg.query_pre_attn_scalar),
            sliding_window=cfg.sliding_window, pad_token_id=0,
            layer_types=[_HF_LAYER_TYPES[t] for t in cfg.layer_types],
        )
    elif cfg.arch == "llama":
        kw.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    return kw

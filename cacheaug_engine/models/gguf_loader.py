"""Load a llama.cpp GGUF file (Llama / SmolLM2 architecture) into a Decoder.

Metadata -> DecoderConfig, tensors -> ``gguf.quants.dequantize`` (float32), then undo the
Q/K row permutation llama.cpp's converter applies for its interleaved ("NORM") RoPE so
that our HF-style rotate-half RoPE applies. Dequantized weights are cached per process
(keyed by the file's path, size and mtime); every call still returns its own copy.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .config import DecoderConfig
from .decoder import Decoder
from .weight_checks import check_weight

if TYPE_CHECKING:
    from gguf import GGUFReader

SUPPORTED_GGUF_ARCHS = ("llama",)
_NAMES = {
    "attn_norm": "attn_norm", "ffn_norm": "mlp_norm",
    "attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj", "attn_output": "attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def open_gguf(path: str | Path) -> GGUFReader:
    """A GGUFReader; any failure to parse becomes a ValueError naming the file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader fails in numpy/struct code on truncated or corrupt files
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def field(reader: Any, key: str, default: Any = None) -> Any:
    """Metadata value ``key`` (str, number, bool or list), or ``default`` when absent."""
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_config(reader: Any, path: str | Path = "<gguf>") -> DecoderConfig:
    """DecoderConfig from GGUF metadata (``{arch}.block_count`` etc.)."""
    arch = field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ValueError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_GGUF_ARCHS)} "
            "(convert other models to a HF safetensors directory)"
        )

    def need(key: str) -> Any:
        value = field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    if heads < 1:
        raise ValueError(f"{path}: GGUF {arch}.attention.head_count: expected an integer >= 1, got {heads}")
    tokens = field(reader, "tokenizer.ggml.tokens")
    vocab = field(reader, f"{arch}.vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        raise ValueError(f"{path}: GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    scaling = None
    stype = field(reader, f"{arch}.rope.scaling.type")
    if stype not in (None, "none"):
        if stype != "linear":
            raise ValueError(f"{path}: unsupported GGUF rope scaling {stype!r} (supported: none, linear)")
        scaling = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(f"{path}: GGUF rope_freqs (Llama-3.1 frequency factors) is not supported")
    key_len = field(reader, f"{arch}.attention.key_length") or field(reader, f"{arch}.rope.dimension_count")
    if key_len is None and hidden % heads:
        raise ValueError(
            f"{path}: GGUF {arch}.embedding_length ({hidden}) is not a multiple of attention.head_count ({heads})"
        )
    head_dim = int(hidden // heads if key_len is None else key_len)
    kv_heads = field(reader, f"{arch}.attention.head_count_kv")
    kw = dict(
        arch="llama", vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")), num_layers=int(need("block_count")),
        num_heads=heads, num_kv_heads=heads if kv_heads is None else int(kv_heads),
        head_dim=head_dim, rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(field(reader, f"{arch}.rope.freq_base", 10000.0)), rope_scaling=scaling,
        max_position_embeddings=int(field(reader, f"{arch}.context_length", 8192)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=field(reader, "tokenizer.ggml.eos_token_id"),
    )
    try:
        return DecoderConfig(**kw)
    except ValueError as e:
        raise ValueError(f"{path}: GGUF metadata: {e}") from None


def unpermute_qk(w: Tensor, n_head: int) -> Tensor:
    """Undo llama.cpp's ``permute`` of Q/K rows (interleaved RoPE pairs -> rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_name_to_ours(name: str) -> str | None:
    """GGUF tensor name -> our parameter name (None if unknown)."""
    if name == "token_embd.weight":
        return "embed_tokens.weight"
    if name == "output_norm.weight":
        return "norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    m = _BLOCK.match(name)
    if m is None or m.group(2) not in _NAMES:
        return None
    return f"layers.{m.group(1)}.{_NAMES[m.group(2)]}.{m.group(3)}"


def _dequantize(tensor: Any, path: Path) -> np.ndarray:
    from gguf import quants

    expected = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    try:
        out = quants.dequantize(tensor.data, tensor.tensor_type)
        return np.array(out, dtype=np.float32).reshape(expected)  # a writable copy, off the memmap
    except Exception as e:
        raise ValueError(
            f"{path}: cannot dequantize tensor {tensor.name} ({tensor.tensor_type.name}, shape {expected}): "
            f"{type(e).__name__}: {e}"
        ) from None


@functools.lru_cache(maxsize=4)
def _read_gguf(path_str: str, size: int, mtime_ns: int) -> tuple[DecoderConfig, dict[str, Tensor]]:
    path = Path(path_str)
    reader = open_gguf(path)
    cfg = gguf_config(reader, path)
    state: dict[str, Tensor] = {}
    for t in reader.tensors:
        ours = gguf_name_to_ours(t.name)
        if ours is None:
            raise ValueError(f"{path}: unexpected GGUF tensor {t.name!r} for a {cfg.arch} model")
        w = torch.from_numpy(_dequantize(t, path))
        if ours.endswith("attn.q_proj.weight") or ours.endswith("attn.q_proj.bias"):
            w = unpermute_qk(w, cfg.num_heads)
        elif ours.endswith("attn.k_proj.weight") or ours.endswith("attn.k_proj.bias"):
            w = unpermute_qk(w, cfg.num_kv_heads)
        state[ours] = w
    if any(k.endswith("q_proj.bias") for k in state):
        cfg = DecoderConfig(**{**cfg.to_dict(), "qkv_bias": True})
    return cfg, state


def read_gguf_weights(path: str | Path) -> tuple[DecoderConfig, dict[str, Tensor]]:
    """(config, float32 state dict with our names), cached per process. Do not modify the tensors."""
    p = Path(path).resolve()
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    st = os.stat(p)
    return _read_gguf(str(p), st.st_size, st.st_mtime_ns)


def load_gguf_decoder(path: str | Path, dtype: torch.dtype = torch.float32, *, check_finite: bool = True) -> Decoder:
    """A frozen Decoder from a .gguf file; its weights are a private copy in ``dtype``, checked finite
    (ValueError naming the file and tensor) unless ``check_finite=False``."""
    cfg, cached = read_gguf_weights(path)
    if check_finite:
        for name, w in cached.items():
            check_weight(path, name, w)
    state = {k: v.to(dtype=dtype, copy=True) for k, v in cached.items()}
    return Decoder.from_weights(cfg, state, source=path)

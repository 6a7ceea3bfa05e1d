"""Load a HF-format directory: config.json + model.safetensors (or a sharded index)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .config import DecoderConfig
from .decoder import Decoder
from .weight_checks import check_weight

_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
_COMMON = {
    "self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj", "self_attn.o_proj": "attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj", "mlp.down_proj": "mlp.down_proj",
    "input_layernorm": "attn_norm",
}
_LLAMA_NORMS = {"post_attention_layernorm": "mlp_norm"}  # Llama/Qwen2: the norm before the MLP
_GEMMA_NORMS = {
    "post_attention_layernorm": "attn_post_norm", "pre_feedforward_layernorm": "mlp_norm",
    "post_feedforward_layernorm": "mlp_post_norm",
}


def read_hf_config(path: str | Path) -> DecoderConfig:
    """DecoderConfig from ``path/config.json`` (clear errors for missing/corrupt/unsupported)."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: no config.json in the model directory {path}")
    try:
        hf = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{cfg_file}: expected a JSON object")
    try:
        return DecoderConfig.from_hf(hf)
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}") from None


def hf_to_ours(name: str, cfg: DecoderConfig) -> str | None:
    """Map a HF parameter name to ours (None for ignored buffers such as rotary inv_freq)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    for prefix in ("model.", ""):
        if name in (f"{prefix}embed_tokens.weight", f"{prefix}norm.weight"):
            return name[len(prefix):]
    if name == "lm_head.weight":
        return name
    m = _LAYER.match(name)
    if m is None:
        return name  # reported as unexpected by Decoder.load_weights
    idx, rest = m.groups()
    mod, _, attr = rest.rpartition(".")
    table = {**_COMMON, **(_GEMMA_NORMS if cfg.post_norms else _LLAMA_NORMS)}
    return f"layers.{idx}.{table.get(mod, mod)}.{attr}"


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index (no 'weight_map'): {e}") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: shard listed in {index.name} is missing")
        return files
    if single.is_file():
        return [single]
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if others:
        return [path / n for n in others]
    hint = " (only PyTorch .bin weights found; convert to safetensors)" if list(path.glob("*.bin")) else ""
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")


def read_safetensors(files: list[Path], *, check_finite: bool = True) -> dict[str, Tensor]:
    """All tensors of the given safetensors files; a corrupt file, an integer tensor or (with
    ``check_finite``) a NaN/Inf value raises ValueError naming the file (and the tensor)."""
    state: dict[str, Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    state[key] = fh.get_tensor(key)
                    check_weight(f, key, state[key], check_finite=check_finite)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{f}: cannot read safetensors weights ({e})") from None
    return state


def load_hf_decoder(path: str | Path, dtype: torch.dtype = torch.float32, *, check_finite: bool = True) -> Decoder:
    """A frozen Decoder from a HF directory (Llama/SmolLM2, Qwen2, Gemma-2), weights cast to dtype
    (floating-point weights only; finite unless ``check_finite=False``)."""
    path = Path(path)
    cfg = read_hf_config(path)
    raw = read_safetensors(_weight_files(path), check_finite=check_finite)
    state: dict[str, Tensor] = {}
    for name, tensor in raw.items():
        ours = hf_to_ours(name, cfg)
        if ours is not None:
            state[ours] = tensor.to(dtype)
    return Decoder.from_weights(cfg, state, source=path)

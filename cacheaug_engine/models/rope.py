"""Rotary position embeddings (HF "rotate_half" layout), with linear and Llama-3 scaling."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import DecoderConfig


def inv_freq(cfg: DecoderConfig, device: torch.device | str = "cpu") -> Tensor:
    """float32 [head_dim // 2] inverse frequencies, computed exactly as transformers does."""
    dim = cfg.head_dim
    freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return freq
    if scaling["rope_type"] == "linear":
        return freq / float(scaling["factor"])
    # llama3: long wavelengths divided by factor, short kept, smooth interpolation between.
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > low_wavelen, freq / factor, freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(cfg: DecoderConfig, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """positions long [B, T] -> (cos, sin) [B, 1, T, head_dim] in ``dtype`` (computed in float32)."""
    freqs = positions.float().unsqueeze(-1) * inv_freq(cfg, positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, Dh] rotated by (cos, sin) [B, 1, T, Dh]."""
    return x * cos + _rotate_half(x) * sin

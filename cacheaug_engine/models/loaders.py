"""``load_decoder`` / ``load_tokenizer``: one entry point for HF directories and .gguf files."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import check_float_dtype
from .decoder import Decoder

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def _kind(path: str | Path) -> str:
    p = Path(path)
    if p.is_dir():
        return "hf"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory (expected a HF model dir or a .gguf file)")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF" or p.suffix.lower() == ".gguf":
        return "gguf"
    raise ValueError(f"{p}: not a model directory and not a GGUF file (magic {magic!r}, expected b'GGUF')")


def load_decoder(path: str | Path, dtype: torch.dtype = torch.float32) -> Decoder:
    """A frozen Decoder from a HF directory (config.json + safetensors, sharded or not) or a .gguf file.

    GGUF weights are dequantized once per process (cached); each call returns a new Decoder.
    Corrupt or unsupported files raise ValueError / FileNotFoundError naming the file; ``dtype``
    must be a floating dtype (checked before anything is read).
    """
    check_float_dtype(dtype)
    if _kind(path) == "hf":
        from .hf import load_hf_decoder

        return load_hf_decoder(path, dtype)
    from .gguf_loader import load_gguf_decoder

    return load_gguf_decoder(path, dtype)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A ``tokenizers.Tokenizer``: ``tokenizer.json`` of a HF directory, or built from GGUF metadata."""
    from .tokenizer import load_gguf_tokenizer, load_hf_tokenizer

    if _kind(path) == "hf":
        return load_hf_tokenizer(path)
    return load_gguf_tokenizer(path)

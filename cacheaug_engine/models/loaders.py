"""``load_decoder`` / ``load_tokenizer``: one entry point for HF directories and .gguf files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import DecoderConfig, check_float_dtype
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


def load_decoder(path: str | Path, dtype: torch.dtype = torch.float32, *, check_finite: bool = True) -> Decoder:
    """A frozen Decoder from a HF directory (config.json + safetensors, sharded or not) or a .gguf file.

    GGUF weights are dequantized once per process (cached); each call returns a new Decoder.
    Corrupt or unsupported files raise ValueError / FileNotFoundError naming the file; ``dtype``
    must be a floating dtype (checked before anything is read). Weights must be floating point
    (an int32 tensor is refused, not cast) and finite: a NaN/Inf value (a corrupted payload)
    raises ValueError naming the file and tensor; ``check_finite=False`` skips that scan (speed).
    """
    check_float_dtype(dtype)
    if _kind(path) == "hf":
        from .hf import load_hf_decoder

        return load_hf_decoder(path, dtype, check_finite=check_finite)
    from .gguf_loader import load_gguf_decoder

    return load_gguf_decoder(path, dtype, check_finite=check_finite)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A ``tokenizers.Tokenizer``: ``tokenizer.json`` of a HF directory, or built from GGUF metadata."""
    from .tokenizer import load_gguf_tokenizer, load_hf_tokenizer

    if _kind(path) == "hf":
        return load_hf_tokenizer(path)
    return load_gguf_tokenizer(path)


def load_model(spec: str, device: str | torch.device = "cpu", *, check_finite: bool = True) -> Any:
    """A frozen Decoder for "default", a model path, or "random:<config.json>" (fp32); loaded weights
    are checked finite unless ``check_finite=False`` (see :func:`load_decoder`)."""
    from .default import default_model_path  # default imports this module: a local import avoids the loop

    if spec.startswith("random:"):
        cfg_path = Path(spec[len("random:") :])
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path}: no such decoder config file (--model random:<config.json>)")
        try:
            cfg = DecoderConfig.from_dict(json.loads(cfg_path.read_text()))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{cfg_path}: not a JSON decoder config ({e})") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"{cfg_path}: {e}") from None
        model = Decoder.from_config(cfg, dtype=torch.float32, seed=0)
    elif spec == "default":
        model = load_decoder(default_model_path(), check_finite=check_finite)
    else:
        if not Path(spec).exists():
            raise FileNotFoundError(f"{spec}: no such model file or directory")
        model = load_decoder(spec, check_finite=check_finite)
    return model.to(device)

"""``load_decoder`` / ``load_tokenizer``: one entry point for HF directories and .gguf files.

``load_decoder(path, impl=...)`` picks the decoder implementation: our native ``Decoder`` for the
architectures it has (Llama/SmolLM2, Qwen2, Gemma-2, and every .gguf file), else any transformers
causal LM wrapped as a ``TransformersDecoder`` (loaded from the local directory only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import SUPPORTED_ARCHS, DecoderConfig, check_float_dtype
from .decoder import Decoder

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from .transformers_decoder import TransformersDecoder

IMPLS = ("auto", "native", "transformers")


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


def _model_type(path: Path) -> object:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # the native reader reports the missing / corrupt config.json precisely


def load_decoder(
    path: str | Path, dtype: torch.dtype = torch.float32, impl: str = "auto", *, check_finite: bool = True
) -> Decoder | TransformersDecoder:
    """A frozen decoder from a HF directory (config.json + weights, sharded or not) or a .gguf file.

    ``impl``: "native" (our ``Decoder``: Llama/SmolLM2, Qwen2, Gemma-2 directories and .gguf
    files), "transformers" (``AutoModelForCausalLM.from_pretrained(path, local_files_only=True)``
    wrapped as a ``TransformersDecoder``: any causal LM transformers can load from the directory,
    nothing fetched; needs the ``transformers`` extra), or "auto" (native when the directory's
    ``model_type`` is one of ours, else transformers).

    GGUF weights are dequantized once per process (cached); each call returns a new decoder.
    Corrupt or unsupported files raise ValueError / FileNotFoundError naming the file; ``dtype``
    must be a floating dtype and ``impl`` one of IMPLS (checked before anything is read). Native
    weights must be floating point (an int32 tensor is refused, not cast) and finite: a NaN/Inf value
    (a corrupted payload) raises ValueError naming the file and tensor; ``check_finite=False`` skips
    that scan (speed).
    """
    check_float_dtype(dtype)
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    kind = _kind(path)
    if kind == "gguf" and impl == "transformers":
        raise ValueError(f"{path}: a .gguf file loads with impl='native' (or 'auto') only")
    if kind == "hf":
        p = Path(path)
        if impl == "transformers" or (impl == "auto" and _model_type(p) not in (*SUPPORTED_ARCHS, None)):
            return _load_transformers(p, dtype)
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


def load_model(
    spec: str, device: str | torch.device = "cpu", impl: str = "auto", *, check_finite: bool = True
) -> Any:
    """A frozen decoder for "default", a model path, or "random:<config.json>" (fp32); ``impl`` and
    ``check_finite`` as in :func:`load_decoder` (for a model path)."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
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
        model = load_decoder(spec, impl=impl, check_finite=check_finite)
    return model.to(device)


def _load_transformers(path: Path, dtype: torch.dtype) -> TransformersDecoder:
    """``AutoModelForCausalLM`` from the local directory (nothing fetched), wrapped."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ImportError(
            f"{path}: model_type {_model_type(path)!r} needs the transformers implementation: "
            "pip install 'cacheaug-engine[transformers]' (native: llama, qwen2, gemma2)"
        ) from None
    from .transformers_decoder import TransformersDecoder

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'}: no config.json in the model directory {path}")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    return TransformersDecoder(model)

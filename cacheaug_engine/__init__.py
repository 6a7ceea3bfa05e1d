"""cacheaug-engine: fused kernels for differentiable cache augmentation.

A frozen decoder builds its KV cache; a trainable coprocessor reads it and writes latent
embeddings that are appended to it. See README.md.
"""

from __future__ import annotations

from cacheaug_engine.ops.backends import BackendUnavailableError, backends

from .ops import cascade_decode, decode_attention, merge_states, segment_attention

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "backends",
    "segment_attention",
    "decode_attention",
    "cascade_decode",
    "merge_states",
    "__version__",
]

"""Tokenizers and text <-> ids: the byte tokenizer, the model's own tokenizer, and helpers that
accept either (``encode``, ``decode``, ``eos_id``, ``tokenizer_fingerprint``)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol


def load_tok(spec: str | None, model_spec: str) -> Any:
    """The tokenizer: "bytes", a path, or (None) the model's own."""
    from cacheaug_engine.models import default_model_path, load_tokenizer

    if spec == "bytes":
        return ByteTokenizer()
    if spec is None:
        if model_spec.startswith("random:"):
            return ByteTokenizer()
        spec = str(default_model_path()) if model_spec == "default" else model_spec
    if not Path(spec).exists():
        raise FileNotFoundError(f"{spec}: no such tokenizer file or directory")
    return load_tokenizer(spec)


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    def encode(self, text: str) -> Any: ...  # noqa: D102

    def decode(self, ids: Sequence[int]) -> str: ...  # noqa: D102


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 3..258; 0 pad, 1 BOS, 2 EOS) - for tests and tiny models."""

    vocab_size = 259
    bos_token_id, eos_token_id = 1, 2

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special ids dropped)."""
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids from a tokenizers.Tokenizer (``.encode(t).ids``) or any ``encode -> list``."""
    out = tokenizer.encode(text)
    ids = getattr(out, "ids", out)
    return list(ids)


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Text for ``ids`` through the tokenizer's ``decode``."""
    return tokenizer.decode(list(ids))


def eos_id(tokenizer: Any, default: int | None = None) -> int | None:
    """The tokenizer's end-of-text id when it exposes one."""
    for attr in ("eos_token_id", "eos_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    if hasattr(tokenizer, "token_to_id"):
        for name in ("<|endoftext|>", "<|im_end|>", "</s>", "<eos>"):
            v = tokenizer.token_to_id(name)
            if v is not None:
                return int(v)
    return default


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable id of a tokenizer, for the token cache key."""
    if hasattr(tokenizer, "to_str"):
        return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]
    inner = getattr(tokenizer, "tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if inner is not None and hasattr(inner, "to_str"):
        return hashlib.sha256(inner.to_str().encode()).hexdigest()[:16]
    return f"{type(tokenizer).__name__}-{getattr(tokenizer, 'vocab_size', 'x')}"

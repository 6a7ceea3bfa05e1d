"""Tokenizers as ``tokenizers.Tokenizer``: from a HF directory or built from GGUF metadata.

GGUF: ``tokenizer.ggml.model == "gpt2"`` is GPT-2 byte-level BPE (SmolLM2, Qwen2, Llama-3):
vocab = ``tokenizer.ggml.tokens`` (already in the byte-level alphabet), merges =
``tokenizer.ggml.merges``, tokens typed CONTROL (3) become special tokens, USER_DEFINED
(4) added tokens. The split regex follows ``tokenizer.ggml.pre`` as llama.cpp does
(SmolLM2's "smollm": single digits, then the GPT-2 pattern).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp pre-tokenizer name -> list of split regexes applied in turn
_PRE = {
    "default": [_GPT2_SPLIT], "gpt-2": [_GPT2_SPLIT],
    "smollm": [r"\p{N}", _GPT2_SPLIT], "starcoder": [r"\p{N}", _GPT2_SPLIT],
    "refact": [r"\p{N}", _GPT2_SPLIT],
    "llama-bpe": [_LLAMA3_SPLIT], "llama3": [_LLAMA3_SPLIT], "qwen2": [_QWEN2_SPLIT],
}


def load_hf_tokenizer(path: str | Path) -> Tokenizer:
    """``tokenizer.json`` of a HF model directory."""
    f = Path(path) / "tokenizer.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no tokenizer.json in the model directory {path}")
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:
        raise ValueError(f"{f}: cannot read the tokenizer ({e})") from None


def build_bpe_tokenizer(
    tokens: list[str], merges: list[str], token_types: list[int] | None = None, pre: str | None = None
) -> Tokenizer:
    """A byte-level BPE ``Tokenizer`` from GGUF-style vocab, merges ("a b") and token types."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [(a, b) for a, _, b in (m.partition(" ") for m in merges)]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    splits = _PRE.get(pre or "default")
    if splits is None:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: {sorted(_PRE)}")
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tk.decoder = decoders.ByteLevel()
    types = list(token_types or [0] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(f"token_type has {len(types)} entries for {len(tokens)} tokens")
    typed = list(zip(tokens, types, strict=True))
    special = [AddedToken(t, special=True, normalized=False) for t, ty in typed if ty == 3]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in typed if ty == 4]
    if special:
        tk.add_special_tokens(special)
    if user:
        tk.add_tokens(user)
    return tk


def load_gguf_tokenizer(path: str | Path) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` built from a GGUF file's ``tokenizer.ggml.*`` metadata."""
    from .gguf_loader import field, open_gguf

    reader = open_gguf(path)
    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: unsupported GGUF tokenizer model {kind!r} (supported: 'gpt2')")
    tokens: Any = field(reader, "tokenizer.ggml.tokens")
    merges: Any = field(reader, "tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ValueError(f"{path}: GGUF metadata lacks tokenizer.ggml.tokens / tokenizer.ggml.merges")
    try:
        types = field(reader, "tokenizer.ggml.token_type")
        return build_bpe_tokenizer(list(tokens), list(merges), types, field(reader, "tokenizer.ggml.pre"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None

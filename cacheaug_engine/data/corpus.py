"""Training text: documents -> deterministic train/held-out split -> tokens (cached) -> packed sequences.

Sources: text files (split into paragraph groups), JSONL files (one document per line, field
"text"), or the default corpus that every Python install carries: ``pydoc_data.topics``
(the language reference's prose) plus the docstrings of the standard library's modules,
read with ``ast`` (nothing is imported). The split is by document, decided by a hash of
the document's id, so held-out text is never seen in training whatever the sequence length.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cacheaug_engine.data.text import encode, eos_id, tokenizer_fingerprint
from cacheaug_engine.fileio import atomic_write

# (id, text); a file's documents are "<file name>:<index>": the held-out split (a hash of the id)
# stays the same wherever the file is copied, so a run's held-out documents are never trained on
# by a run of the same file at another path
Document = tuple[str, str]
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "turtledemo"}














# -- documents -------------------------------------------------------------------------------------
def default_documents() -> list[Document]:
    """pydoc_data topics plus stdlib module docstrings (>= 200 characters), in a fixed order."""
    from pydoc_data.topics import topics

    docs: list[Document] = [(f"topic:{k}", v) for k, v in sorted(topics.items()) if v.strip()]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS or part.startswith("test_") for part in rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        doc = ast.get_docstring(tree)
        if doc and len(doc) >= 200:
            docs.append((f"module:{rel.as_posix()}", doc))
    return docs


def _paragraph_docs(path: Path, text: str, target_chars: int = 2000) -> list[Document]:
    """Split a text file into documents of about ``target_chars`` at blank lines."""
    out, buf, size = [], [], 0
    for para in text.split("\n\n"):
        buf.append(para)
        size += len(para) + 2
        if size >= target_chars:
            out.append((f"{path.name}:{len(out)}", "\n\n".join(buf)))
            buf, size = [], 0
    if any(p.strip() for p in buf):
        out.append((f"{path.name}:{len(out)}", "\n\n".join(buf)))
    return out


def read_documents(paths: Iterable[str | os.PathLike]) -> list[Document]:
    """Documents from text files and JSONL files (``.jsonl``: the "text" field of each line).

    Raises FileNotFoundError / ValueError with the offending path and line.
    """
    docs: list[Document] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            raise IsADirectoryError(f"{path}: is a directory; expected a text (.txt) or .jsonl data file")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: data file not found (expected a text or .jsonl file)")
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{i}: invalid JSON ({e.msg})") from None
                    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                        raise ValueError(f'{path}:{i}: expected an object with a string "text" field')
                    docs.append((f"{path.name}:{i}", rec["text"]))
        else:
            docs.extend(_paragraph_docs(path, path.read_text(encoding="utf-8", errors="replace")))
    if not docs:
        raise ValueError("no documents found in the data files")
    return docs


def is_heldout(doc_id: str, heldout_frac: float, seed: int = 0) -> bool:
    """Deterministic document-level split: a hash of (seed, id) below the held-out fraction."""
    h = zlib.crc32(f"{seed}:{doc_id}".encode()) / 2**32
    return h < heldout_frac


def split_documents(docs: list[Document], heldout_frac: float, seed: int = 0) -> tuple[list[Document], list[Document]]:
    """(train, heldout) by :func:`is_heldout`; guarantees one held-out doc when there are >= 2."""
    if not 0.0 <= heldout_frac < 1.0:
        raise ValueError(f"heldout_frac must be in [0, 1), got {heldout_frac}")
    train = [d for d in docs if not is_heldout(d[0], heldout_frac, seed)]
    held = [d for d in docs if is_heldout(d[0], heldout_frac, seed)]
    if heldout_frac > 0 and not held and len(docs) >= 2:
        held, train = [train[-1]], train[:-1]
    return train, held


# -- tokens ----------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where tokenised corpora are cached ($CACHEAUG_CACHE, else ~/.cache/cacheaug)."""
    return Path(os.environ.get("CACHEAUG_CACHE", Path.home() / ".cache" / "cacheaug"))


def tokenize_documents(
    docs: list[Document], tokenizer: Any, *, cache: str | os.PathLike | None = None, use_cache: bool = True
) -> np.ndarray:
    """All documents' tokens concatenated, each followed by EOS (int32). Cached on disk by content."""
    fp = tokenizer_fingerprint(tokenizer)
    h = hashlib.sha256(fp.encode())
    for doc_id, text in docs:
        h.update(doc_id.encode())
        h.update(b"\0")
        h.update(text.encode())
        h.update(b"\1")
    path = Path(cache or cache_dir()) / f"tokens-{h.hexdigest()[:24]}.npy"
    if use_cache and path.is_file():
        try:
            return np.load(path)
        except (OSError, ValueError):
            pass
    eos = eos_id(tokenizer)
    chunks = []
    for _, text in docs:
        ids = encode(tokenizer, text)
        if eos is not None:
            ids.append(eos)
        chunks.append(np.asarray(ids, dtype=np.int32))
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    if use_cache:
        try:
            atomic_write(path, lambda tmp: _save_array(tmp, tokens))
        except OSError:
            pass
    return tokens


def pack(tokens: np.ndarray, seq_len: int) -> Tensor:
    """Non-overlapping sequences of ``seq_len`` tokens: long [n, seq_len] (the tail is dropped)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    n = len(tokens) // seq_len
    return torch.from_numpy(tokens[: n * seq_len].astype(np.int64)).view(n, seq_len)


def _save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a path
        np.save(f, array)


@dataclass
class Corpus:
    """Packed train and held-out sequences, long [n, seq_len] each."""

    train: Tensor
    heldout: Tensor
    num_docs: tuple[int, int]

    def describe(self) -> str:
        """One line: sizes of both splits."""
        t, h = self.train, self.heldout
        width = t.shape[1] if t.numel() else 0
        return (
            f"{t.shape[0]} train / {h.shape[0]} held-out sequences of {width} tokens "
            f"({self.num_docs[0]} / {self.num_docs[1]} documents)"
        )


def load_corpus(
    tokenizer: Any,
    seq_len: int,
    *,
    files: Sequence[str] | None = None,
    heldout_frac: float = 0.05,
    seed: int = 0,
    cache: str | os.PathLike | None = None,
    max_chars: int | None = None,
) -> Corpus:
    """Documents (``files`` or the default corpus) -> split -> tokens -> packed sequences.

    ``max_chars`` truncates the document list (after the split, each side separately) for
    quick runs.
    """
    docs = read_documents(files) if files else default_documents()
    train, held = split_documents(docs, heldout_frac, seed)
    if max_chars is not None:
        train, held = _truncate(train, max_chars), _truncate(held, max(max_chars // 10, 1))
    tr = pack(tokenize_documents(train, tokenizer, cache=cache), seq_len)
    he = pack(tokenize_documents(held, tokenizer, cache=cache), seq_len)
    if tr.shape[0] == 0:
        raise ValueError(f"not enough training text for one sequence of {seq_len} tokens")
    return Corpus(train=tr, heldout=he, num_docs=(len(train), len(held)))


def _truncate(docs: list[Document], max_chars: int) -> list[Document]:
    out, total = [], 0
    for d in docs:
        if total >= max_chars:
            break
        out.append(d)
        total += len(d[1])
    return out


class SequenceLoader:
    """Deterministic shuffled batches over packed sequences, resumable from ``state_dict``.

    Epoch e visits the sequences in the order of ``randperm(n)`` seeded with (seed, e);
    the state is just (epoch, index), so a resumed run sees exactly the same batches.
    """

    def __init__(self, sequences: Tensor, batch_size: int, seed: int = 0) -> None:
        if sequences.shape[0] < 1:
            raise ValueError("no sequences to load")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sequences, self.batch_size, self.seed = sequences, batch_size, seed
        self.epoch, self.index = 0, 0
        self._perm = self._order(0)

    def _order(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.sequences.shape[0], generator=g)

    def next_batch(self) -> Tensor:
        """The next ``batch_size`` sequences (wrapping into the next epoch), long [B, T]."""
        rows = []
        while len(rows) < self.batch_size:
            if self.index >= len(self._perm):
                self.epoch += 1
                self.index = 0
                self._perm = self._order(self.epoch)
            rows.append(int(self._perm[self.index]))
            self.index += 1
        return self.sequences[rows]

    def state_dict(self) -> dict[str, int]:
        """Position in the data stream."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position; ValueError when it lies outside this stream (an index past
        the epoch's sequences would silently wrap into the next epoch)."""
        n = self.sequences.shape[0]
        for key, high in (("epoch", None), ("index", n), ("seed", None)):
            v = state.get(key, self.seed if key == "seed" else None)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (high is not None and v > high):
                want = f"an integer in [0, {high}] (this corpus has {n} sequences)" if high else "an integer >= 0"
                raise ValueError(f"loader position: {key} expected {want}, got {v!r}")
        self.seed = int(state.get("seed", self.seed))
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._perm = self._order(self.epoch)

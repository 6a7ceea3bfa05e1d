"""Input checks shared by every room, run before any model is loaded or any kernel launched.

Every bad value gets one ValueError that names the setting (config key and ``--flag``, or the
argument) and what was expected, so the CLI can print one line and exit 2 before minutes of
loading or training are spent: field types and finiteness of a config dataclass, ints and
numbers in range, the device name, data paths, a writable output directory or file. What only
training checks (a TrainConfig's ranges, what a ``--resume`` may change) is in train/preflight.py.
"""

from __future__ import annotations

import math
import os
import tempfile
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch


def flag(name: str) -> str:
    """``lr`` -> ``lr (--lr)``: the config key and its command-line flag, for messages."""
    return f"{name} (--{name.replace('_', '-')})"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _type_ok(v: Any, ann: Any) -> bool:
    origin = typing.get_origin(ann)
    if origin is list:
        (inner,) = typing.get_args(ann)
        return isinstance(v, list) and all(_type_ok(x, inner) for x in v)
    args = typing.get_args(ann)
    if args:  # X | None
        return any(_type_ok(v, a) for a in args)
    if ann is type(None):
        return v is None
    if ann is bool:
        return isinstance(v, bool)
    if ann is int:
        return _is_int(v)
    if ann is float:
        return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)
    return isinstance(v, ann)


def _type_name(ann: Any) -> str:
    if typing.get_origin(ann) is list:
        return f"a list of {_type_name(typing.get_args(ann)[0])}"
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if args:
        return f"{_type_name(args[0])} or null"
    return {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}.get(ann, str(ann))


def check_field_types(cfg: Any) -> None:
    """Every dataclass field of ``cfg`` has its annotated type; floats are finite (no nan/inf)."""
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if not _type_ok(v, hints[f.name]):
            raise ValueError(f"{flag(f.name)}: expected {_type_name(hints[f.name])}, got {v!r}")






def check_device(name: Any, what: str = "device (--device)") -> None:
    """``name`` is "auto", "cpu", "mps" or an available "cuda[:N]"; else ValueError naming ``what``."""
    if name == "auto":
        return
    expected = "'auto', 'cpu' or 'cuda[:N]'"
    if not isinstance(name, str):
        raise ValueError(f"{what}: expected {expected}, got {name!r}")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{what}: expected {expected}, got {name!r}") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{what}: expected {expected}, got {name!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what}: {name!r} requested but no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{what}: {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")


SNIFF_BYTES = 8192
_TEXT_CONTROLS = {8, 9, 10, 12, 13, 27}  # backspace, tab, newline, form feed, return, escape


def binary_reason(path: Path) -> str | None:
    """Why the file looks binary (a NUL byte, or > 10% control bytes in its first 8 KiB), or None for text."""
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    nul = head.find(b"\0")
    if nul >= 0:
        return f"a NUL byte at offset {nul}"
    controls = sum(1 for b in head if b < 32 and b not in _TEXT_CONTROLS)
    if head and controls > 0.1 * len(head):
        return f"{controls} control bytes in its first {len(head)}"
    return None


def check_data_files(paths: list[str], what: str = "data (--data)") -> None:
    """Each path is an existing file (a directory or a missing path is named as such) holding text:
    a binary file (NUL or many control bytes in its first 8 KiB) is refused, not trained on as bytes."""
    for p in paths:
        path = Path(p)
        if path.is_dir():
            raise ValueError(f"{what}: {path} is a directory; expected text (.txt) or .jsonl files")
        if not path.is_file():
            raise FileNotFoundError(f"{what}: {path}: no such file (expected a text or .jsonl file)")
        try:
            reason = binary_reason(path)
        except OSError as e:
            reason = e.strerror or str(e)
            raise ValueError(f"{what}: {path}: cannot read ({reason}); expected a readable text file") from None
        if reason:
            raise ValueError(f"{what}: {path} looks binary ({reason}); expected a UTF-8 text (.txt) or .jsonl file")






def probe_writable_dir(path: str | os.PathLike, what: str = "out (--out)") -> Path:
    """Create ``path`` (and parents) and a temporary file in it, then remove the file.

    Raises ValueError naming ``what`` when the directory cannot be created or written, so an
    unwritable output is found before the model is loaded, not at the first save.
    """
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".cacheaug-probe-", dir=p)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        reason = e.strerror or str(e)
        raise ValueError(f"{what}: cannot write to {p} ({reason}); expected a writable directory") from None
    return p


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` can be written as a file: not a directory, and its directory is writable (probed)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what}: {p} is a directory; expected a file path to write")
    probe_writable_dir(p.parent if str(p.parent) else Path("."), what)
    return p






def check_int(value: Any, what: str, low: int, high: int | None = None) -> int:
    """``value`` is an integer in [low, high] (high None: no upper bound); else ValueError naming ``what``."""
    ok = _is_int(value) and value >= low and (high is None or value <= high)
    if not ok:
        want = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
        raise ValueError(f"{what}: expected {want}, got {value!r}")
    return value


def check_number(value: Any, what: str, low: float, *, strict: bool = False) -> float:
    """``value`` is a finite number >= low (> low when ``strict``); else ValueError naming ``what``."""
    ok = (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
    if not ok or not (value > low if strict else value >= low):
        raise ValueError(f"{what}: expected a finite number {'>' if strict else '>='} {low}, got {value!r}")
    return float(value)



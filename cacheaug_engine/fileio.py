"""Atomic file writes: the one helper every writer of results and checkpoints uses.

A file is written to a temporary name beside its target, fsynced, then renamed over the
target (``os.replace``) and the directory fsynced, so a reader never sees a half-written file
and a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write JSON atomically (tmp file + fsync + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path

"""Durable, atomic file writes: the one set of helpers every writer of results and checkpoints uses.

``atomic_write(path, write)`` has ``write`` fill a temporary file beside the target, fsyncs it,
renames it over the target (``os.replace``) and fsyncs the directory, so a reader never sees a
half-written file and a crash leaves either the old file or the new one. Checkpoint directories
(train/checkpoint.py, train/dist_checkpoint.py) are built from the same pieces: every file is
written and fsynced (``fsync_file`` / ``write_text_synced``) inside a temporary directory, the
directory is fsynced (``fsync_dir``), and only then is it swapped in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to the disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike, *, missing_ok: bool = False) -> None:
    """Flush a directory's entries (names created, renamed or removed in it) to the disk.

    ``missing_ok``: a directory that cannot be opened, or a filesystem that cannot fsync one,
    is skipped instead of raising."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if missing_ok:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not missing_ok:
            raise
    finally:
        os.close(fd)


def write_text_synced(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` and fsync it (no rename: for files inside a temp directory)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary file beside it, which is fsynced,
    renamed over ``path`` and the directory fsynced. On an error the temporary file is removed and
    the previous ``path`` (if any) is untouched. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent, missing_ok=True)
    return path


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as JSON (indent 1) atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1), encoding="utf-8"))

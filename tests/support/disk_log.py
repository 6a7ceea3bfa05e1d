"""Record what a save makes durable, in order: every ``os.fsync`` (the path its descriptor covers and
the file's size at that moment), every rename and every ``shutil.rmtree`` (issue 28).

A kill -9 cannot show a missing fsync (the page cache survives the process); this log can. Paths of
fsynced descriptors come from /proc/self/fd (Linux); elsewhere ``DiskLog`` skips the test, visibly.

    log = DiskLog(monkeypatch)
    save_checkpoint(path, ...)
    log.assert_durable_swap(path)
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
from pathlib import Path

import pytest


def _real(p: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(p))


class DiskLog:
    """Patches os.fsync, os.replace, os.rename and shutil.rmtree (through ``monkeypatch``) to log
    ("fsync", path, size or None for a directory), ("rename", src, dst), ("rmtree", path)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        if not sys.platform.startswith("linux") or not os.path.isdir("/proc/self/fd"):
            pytest.skip("DiskLog maps fsynced descriptors to paths through /proc/self/fd (Linux only)")
        self.events: list[tuple] = []
        real_fsync, real_replace, real_rename, real_rmtree = os.fsync, os.replace, os.rename, shutil.rmtree

        def fsync(fd):
            n = fd if isinstance(fd, int) else fd.fileno()
            st = os.fstat(n)
            path = _real(os.readlink(f"/proc/self/fd/{n}"))
            self.events.append(("fsync", path, st.st_size if stat.S_ISREG(st.st_mode) else None))
            return real_fsync(fd)

        def replace(src, dst, **kw):
            self.events.append(("rename", _real(src), _real(dst)))
            return real_replace(src, dst, **kw)

        def rename(src, dst, **kw):
            self.events.append(("rename", _real(src), _real(dst)))
            return real_rename(src, dst, **kw)

        def rmtree(path, *a, **kw):
            self.events.append(("rmtree", _real(path)))
            return real_rmtree(path, *a, **kw)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(shutil, "rmtree", rmtree)

    def index(self, kind: str, *args: str, last: bool = False) -> int | None:
        """Position of the first (or last) event ``(kind, *args, ...)``, None when absent."""
        hits = [i for i, e in enumerate(self.events) if e[0] == kind and e[1 : 1 + len(args)] == args]
        return (hits[-1] if last else hits[0]) if hits else None

    def fsyncs_of(self, path: str) -> list[tuple[int, int | None]]:
        """(event index, size) of every fsync of ``path``."""
        return [(i, e[2]) for i, e in enumerate(self.events) if e[0] == "fsync" and e[1] == path]

    def assert_durable_swap(self, path: str | os.PathLike) -> None:
        """The checkpoint directory now at ``path`` was swapped in durably:

        * it was built in a temp directory renamed onto ``path``;
        * every file in it was fsynced (under its name in the temp directory, or a name renamed to it
          there) at its final size, before anything was renamed onto or away from ``path``;
        * the temp directory itself was fsynced after its last file fsync and last rename inside it,
          before the swap (its entries are durable);
        * the parent was fsynced after the swap and before the old copy was removed.
        """
        final = _real(path)
        parent = os.path.dirname(final)
        moved_in = [i for i, e in enumerate(self.events) if e[0] == "rename" and e[2] == final]
        assert len(moved_in) == 1, f"expected one rename onto {final}: {self.events}"
        swap = moved_in[0]
        tmp = self.events[swap][1]
        first_swap = min(i for i, e in enumerate(self.events) if e[0] == "rename" and final in (e[1], e[2]))
        last_inside = -1
        files = sorted(p.name for p in Path(final).iterdir())
        assert files, f"{final} is empty"
        for name in files:
            names = {os.path.join(tmp, name)}
            for i, e in enumerate(self.events):
                if e[0] == "rename" and e[2] in names and os.path.dirname(e[1]) == tmp:
                    names.add(e[1])
                    last_inside = max(last_inside, i)
            syncs = [(i, size) for n in names for i, size in self.fsyncs_of(n)]
            assert syncs, f"{name} was never fsynced (events: {self.events})"
            i, size = max(syncs)
            assert size == os.path.getsize(os.path.join(final, name)), f"{name} fsynced before its last write"
            assert i < first_swap, f"{name} fsynced only after the swap began"
            last_inside = max(last_inside, i)
        dir_syncs = [i for i, _ in self.fsyncs_of(tmp) if last_inside < i < first_swap]
        assert dir_syncs, f"the temp directory {tmp} was not fsynced after its files, before the swap: {self.events}"
        after = [i for i, _ in self.fsyncs_of(parent) if i > swap]
        assert after, f"the parent {parent} was not fsynced after the swap: {self.events}"
        old = os.path.join(parent, f".{os.path.basename(final)}.old")
        removed = self.index("rmtree", old)
        if removed is not None:
            assert removed > after[0], "the old copy was removed before the swap was durable"

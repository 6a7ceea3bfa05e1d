"""Coprocessor checkpoints that ship inside the package (assets/): the text coprocessor for the
default decoder and its Pause Token control, trained with the commands recorded beside them."""

from __future__ import annotations

from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "smollm2-coprocessor"
PAUSE_DIR = Path(__file__).resolve().parent.parent / "assets" / "smollm2-pause"  # the Pause Token control, same budget


def shipped_coprocessor() -> Path | None:
    """The shipped coprocessor checkpoint directory, if this build has one."""
    return ASSET_DIR if (ASSET_DIR / "state.json").is_file() else None


def shipped_pause() -> Path | None:
    """The shipped pause-table baseline (trained on the coprocessor's budget), if this build has one."""
    return PAUSE_DIR if (PAUSE_DIR / "state.json").is_file() else None

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


# the addition task's pair (data.tasks "addition", 3 digits): cacheaug demo --task addition
TASK_DIRS = {"addition": (Path(__file__).resolve().parent.parent / "assets" / "addition-coprocessor",
                          Path(__file__).resolve().parent.parent / "assets" / "addition-pause")}


def shipped_task_pair(task: str) -> tuple[Path, Path]:
    """(coprocessor, pause table) checkpoint directories shipped for a built-in task; FileNotFoundError
    naming the missing one (a build without assets), ValueError for a task without a shipped pair."""
    if task not in TASK_DIRS:
        raise ValueError(f"task: expected one of {tuple(TASK_DIRS)} (a shipped pair), got {task!r}")
    for d in TASK_DIRS[task]:
        if not (d / "state.json").is_file():
            raise FileNotFoundError(f"{d}: the shipped {task} checkpoint is missing from this build")
    return TASK_DIRS[task]

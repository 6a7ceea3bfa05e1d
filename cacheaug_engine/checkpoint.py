"""Checkpoints: a directory of safetensors + JSON, written atomically.

Layout of a checkpoint directory::

    coprocessor.safetensors   trainable coprocessor tensors (soft tokens, LoRA or full weights, scale)
    optimizer.safetensors     optimizer tensors ("<param index>.<key>") and RNG states ("rng.<name>")
    state.json                coprocessor config, train config, step, schedule, optimizer
                              hyper-parameters and scalars, data position, metrics

Atomicity: everything is written to a temporary sibling directory, each file fsync'ed, then
the directories are swapped (old -> ``.<name>.old``, new -> name, old removed). A crash at
any point leaves either the previous or the new checkpoint loadable; ``load_checkpoint``
falls back to the ``.old`` copy if the crash hit between the two renames.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

COPRO_FILE, OPTIM_FILE, STATE_FILE = "coprocessor.safetensors", "optimizer.safetensors", "state.json"
FORMAT = "cacheaug-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not match what loads it."""


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` returns."""

    path: Path
    state: dict[str, Any]
    coprocessor: dict[str, Tensor]
    optimizer_tensors: dict[str, Tensor] = field(default_factory=dict)

    @property
    def coprocessor_config(self) -> dict[str, Any]:
        """The CoprocessorConfig dict."""
        return self.state["coprocessor"]

    def rng(self, name: str) -> Tensor | None:
        """A saved RNG state tensor ("torch", "positions", "cuda")."""
        return self.optimizer_tensors.get(f"rng.{name}")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _contig(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def optimizer_to_flat(opt_state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors ("<idx>.<key>") and a JSON-able rest."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in opt_state["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_to_flat`."""
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if name.startswith("rng."):
            continue
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = t
    for idx, sc in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: str | os.PathLike,
    *,
    coprocessor: dict[str, Tensor],
    state: dict[str, Any],
    optimizer_tensors: dict[str, Tensor] | None = None,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically (see module docstring). Returns the path."""
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{path.name}.tmp-{os.getpid()}"
    old = parent / f".{path.name}.old"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    meta = {"format": FORMAT}
    save_file(_contig(coprocessor), str(tmp / COPRO_FILE), metadata=meta)
    if optimizer_tensors:
        save_file(_contig(optimizer_tensors), str(tmp / OPTIM_FILE), metadata=meta)
    with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, **state}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    for name in (COPRO_FILE, OPTIM_FILE):
        if (tmp / name).exists():
            _fsync_file(tmp / name)
    _fsync_dir(tmp)
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The directory to read for ``path``: itself, or its ``.old`` copy after an interrupted swap."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    old = path.parent / f".{path.name}.old"
    if not path.exists() and (old / STATE_FILE).is_file():
        return old
    if path.is_file():
        raise CheckpointError(f"{path}: expected a checkpoint directory, got a file")
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    raise CheckpointError(f"{path}: not a checkpoint ({STATE_FILE} missing)")


def load_checkpoint(path: str | os.PathLike, *, with_optimizer: bool = True) -> Checkpoint:
    """Read a checkpoint directory (tensors on the CPU). Raises CheckpointError when unusable."""
    d = resolve_checkpoint(path)
    try:
        with open(d / STATE_FILE, encoding="utf-8") as f:
            state = json.load(f)
        if state.get("format") != FORMAT:
            raise CheckpointError(f"{d}: unknown checkpoint format {state.get('format')!r}")
        copro = load_file(str(d / COPRO_FILE))
        opt = load_file(str(d / OPTIM_FILE)) if with_optimizer and (d / OPTIM_FILE).is_file() else {}
    except CheckpointError:
        raise
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{d}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    except Exception as e:  # safetensors raises its own error type for corrupt files
        raise CheckpointError(f"{d}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    return Checkpoint(path=d, state=state, coprocessor=copro, optimizer_tensors=opt)


def rng_tensors(extra: dict[str, torch.Generator] | None = None) -> dict[str, Tensor]:
    """Current RNG states as tensors: the global torch CPU (and CUDA) RNG plus named generators."""
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    for name, gen in (extra or {}).items():
        out[f"rng.{name}"] = gen.get_state()
    return out


def restore_rng(ckpt: Checkpoint, extra: dict[str, torch.Generator] | None = None) -> None:
    """Restore what :func:`rng_tensors` saved."""
    t = ckpt.rng("torch")
    if t is not None:
        torch.set_rng_state(t)
    c = ckpt.rng("cuda")
    if c is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(c)
    for name, gen in (extra or {}).items():
        s = ckpt.rng(name)
        if s is not None:
            gen.set_state(s)


def export_coprocessor(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: torch.dtype | None = torch.bfloat16,
    note: str | None = None,
) -> Path:
    """Write a slim copy of checkpoint ``src`` at ``dst``: coprocessor tensors (cast to ``dtype``)
    and state.json without the optimizer; ``note`` (e.g. the command that trained it) goes to
    ``dst/COMMAND.md``. This is the format of the coprocessor shipped in cacheaug_engine/assets."""
    ck = load_checkpoint(src, with_optimizer=False)
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in ck.coprocessor.items()
    }
    state = {k: v for k, v in ck.state.items() if k not in ("optimizer", "format")}
    state["exported_from"] = str(ck.path)
    out = save_checkpoint(dst, coprocessor=tensors, state=state)
    if note:
        (out / "COMMAND.md").write_text(note, encoding="utf-8")
    return out

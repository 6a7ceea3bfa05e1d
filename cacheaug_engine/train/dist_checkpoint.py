"""Sharded training checkpoints through torch.distributed.checkpoint (DCP), and their export.

Layout of a distributed checkpoint directory (``<out>/checkpoint-dist``)::

    __*_*.distcp, .metadata   DCP shards: "model.<fqn>" trainable tensors, "optim.*" AdamW state
                              (keyed by parameter name, so any world size can load it), "rng.*"
    train_state.json          coprocessor config, train config, step, data position, history,
                              the world size and global micro-batch that wrote it
    COMPLETE                  written last; a directory without it never loads

Atomicity: all ranks write into a temporary sibling directory; rank 0 then writes
train_state.json and COMPLETE (each fsync'ed) and swaps the directory into place
(old -> ``.<name>.old``, new -> name, old removed). A crash at any point leaves the previous
complete checkpoint (or its ``.old`` copy) as the one that loads.

The loader position and RNG states are the same on every rank (see ``distributed``), so
the checkpoint is world-size independent: DCP reshards the tensors for the loading group.
:func:`export_dist_checkpoint` writes the single-directory format of ``checkpoint`` that
eval, generate and demo read; it needs no process group.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from cacheaug_engine.fileio import fsync_dir, write_text_synced
from cacheaug_engine.train.checkpoint import Checkpoint, CheckpointError, check_state, save_checkpoint, swap_in

STATE_FILE, MARKER = "train_state.json", "COMPLETE"
FORMAT = "cacheaug-dist-checkpoint/1"
_COPRO = "coprocessor."


def trainable_tensors(objective: nn.Module) -> dict[str, torch.Tensor]:
    """fqn -> detached view of every trainable tensor of the objective (+ the latent scale).

    Views share storage with the parameters (DTensor shards under fsdp), so DCP loads in place.
    """
    out = {n: p.detach() for n, p in objective.named_parameters() if p.requires_grad}
    out.setdefault(_COPRO + "log_scale", objective.coprocessor.log_scale.detach())
    return out


def _dcp_state(objective: nn.Module, model: nn.Module, opt: torch.optim.Optimizer, gens: dict[str, Any]) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.fsdp import FSDPModule

    # a forward without backward (held-out eval) leaves the FSDP root's parameters unsharded: the
    # module would then not hold the sharded tensors the optimizer steps
    for m in objective.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    rng = {"torch": torch.get_rng_state(), **{k: g.get_state() for k, g in gens.items()}}
    return {"model": trainable_tensors(objective), "optim": get_optimizer_state_dict(model, opt), "rng": rng}


def resolve_dist_checkpoint(path: str | os.PathLike) -> Path:
    """The complete checkpoint to read for ``path``: itself, or its ``.old`` copy after an
    interrupted swap. Raises CheckpointError when neither is complete."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    old = path.parent / f".{path.name}.old"
    if (old / MARKER).is_file():
        return old
    if not path.exists():
        raise CheckpointError(f"{path}: no such distributed checkpoint")
    raise CheckpointError(f"{path}: incomplete distributed checkpoint ({MARKER} missing: the save was interrupted)")


def read_train_state(path: str | os.PathLike) -> Checkpoint:
    """train_state.json of a complete distributed checkpoint, as a Checkpoint without tensors
    (``.path`` is the directory read; DCP loads the tensors into the wrapped model)."""
    d = resolve_dist_checkpoint(path)
    try:
        state = json.loads((d / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{d}: unreadable {STATE_FILE} ({type(e).__name__}: {e})") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{d}: unknown distributed checkpoint format {state.get('format')!r}")
    check_state(state, d / STATE_FILE)
    return Checkpoint(path=d, state=state, coprocessor={})


def save_dist_checkpoint(
    path: str | os.PathLike,
    *,
    objective: nn.Module,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
    state: dict[str, Any],
) -> Path:
    """Collective: every rank writes its shards; rank 0 writes ``state`` and swaps it in atomically."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    dcp.save(_dcp_state(objective, model, opt, generators), checkpoint_id=str(tmp))
    dist.barrier()  # every rank's shards are on disk before the marker says so
    if rank == 0:
        write_text_synced(tmp / STATE_FILE, json.dumps({"format": FORMAT, **state}, indent=1, sort_keys=True))
        fsync_dir(tmp)
        write_text_synced(tmp / MARKER, "ok\n")
        fsync_dir(tmp)
        swap_in(tmp, path, complete=MARKER)
    dist.barrier()
    return path


def load_dist_checkpoint(
    path: str | os.PathLike,
    *,
    objective: nn.Module,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
) -> dict[str, Any]:
    """Collective: load trainable tensors, optimizer and RNG states in place (resharded to this
    group's world size); returns train_state.json."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    ck = read_train_state(path)
    sd = _dcp_state(objective, model, opt, generators)
    dcp.load(sd, checkpoint_id=str(ck.path))
    set_optimizer_state_dict(model, opt, sd["optim"])
    torch.set_rng_state(sd["rng"]["torch"])
    for k, g in generators.items():
        g.set_state(sd["rng"][k])
    return ck.state


def read_coprocessor_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Full (unsharded) coprocessor tensors of a distributed checkpoint, without a process group.

    Keys as ``Coprocessor.trainable_state`` (no "coprocessor." prefix), fp32 on the CPU.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    d = resolve_dist_checkpoint(path)
    meta = dcp.FileSystemReader(str(d)).read_metadata()
    want = {}
    for key, md in meta.state_dict_metadata.items():
        if key.startswith("model." + _COPRO) and isinstance(md, TensorStorageMetadata):
            want[key] = torch.empty(md.size, dtype=md.properties.dtype)
    if not want:
        raise CheckpointError(f"{d}: no coprocessor tensors in the distributed checkpoint")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": {k[len("model.") :]: v for k, v in want.items()}}, checkpoint_id=str(d), no_dist=True)
    return {k[len("model." + _COPRO) :]: v for k, v in want.items()}


def export_dist_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """Write distributed checkpoint ``src`` as a ``checkpoint``-format directory at ``dst``
    (coprocessor tensors, cast to ``dtype`` when given, and state without the optimizer) that
    ``cacheaug eval`` / ``generate`` / ``demo --init-from`` read. Needs no process group."""
    ck = read_train_state(src)
    state = ck.state
    tensors = read_coprocessor_tensors(ck.path)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    keep = ("coprocessor", "train_config", "step", "history", "evals", "decoder", "lr", "loader")
    out = {k: state[k] for k in keep if k in state}
    out["exported_from"] = str(ck.path)
    return save_checkpoint(dst, coprocessor=tensors, state=out)

"""Checkpoints: a directory of safetensors + JSON, written atomically.

Layout of a checkpoint directory::

    coprocessor.safetensors   trainable coprocessor tensors (soft tokens, LoRA or full weights, scale)
    optimizer.safetensors     optimizer tensors ("<param index>.<key>") and RNG states ("rng.<name>")
    state.json                coprocessor config, train config, step, schedule, optimizer
                              hyper-parameters and scalars, data position, metrics, and what the
                              coprocessor was trained for: ``decoder_identity`` (implementation,
                              architecture, config hash) and ``tokenizer_fingerprint`` (placement and N_L are in
                              the coprocessor config); :func:`check_compatible` refuses a mismatch

Atomicity: everything is written to a temporary sibling directory ``.<name>.tmp-<pid>``,
each file fsync'ed, then the directories are swapped (current -> ``.<name>.old``, temp ->
name, parent fsync'ed, only then ``.old`` removed). A crash at any point leaves either the
previous or the new checkpoint loadable; ``load_checkpoint`` falls back to the ``.old`` copy
if the crash hit between the two renames. Temp dirs of dead processes are removed at the
next save.
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

from cacheaug_engine.augment.coprocessor import Coprocessor, CoprocessorConfig, decoder_identity
from cacheaug_engine.data.text import tokenizer_fingerprint
from cacheaug_engine.fileio import fsync_dir, fsync_file, write_text_synced
from cacheaug_engine.models.weight_checks import count_nonfinite
from cacheaug_engine.train.config import TrainConfig

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
        """The CoprocessorConfig dict (CheckpointError naming state.json when absent)."""
        cfg = self.state.get("coprocessor")
        if not isinstance(cfg, dict):
            raise CheckpointError(
                f"{self.path / STATE_FILE}: no 'coprocessor' section (expected a CoprocessorConfig dict)"
            )
        return cfg

    def train_config(self) -> dict[str, Any]:
        """The TrainConfig dict it was trained with (CheckpointError naming state.json when absent)."""
        cfg = self.state.get("train_config")
        if not isinstance(cfg, dict):
            raise CheckpointError(
                f"{self.path / STATE_FILE}: no 'train_config' section (expected a TrainConfig dict)"
            )
        return cfg

    def rng(self, name: str) -> Tensor | None:
        """A saved RNG state tensor ("torch", "positions", "cuda")."""
        return self.optimizer_tensors.get(f"rng.{name}")


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


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a process of another user counts as alive)."""
    if pid == os.getpid():
        return False  # our own leftover from an earlier failed save: safe to remove
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>`` directories beside checkpoint ``path`` whose process is gone.

    A temp dir of a live process (another run writing into the same directory) is left alone.
    Returns the removed paths.
    """
    path = Path(path)
    removed = []
    prefix = f".{path.name}.tmp-"
    if not path.parent.is_dir():
        return removed
    for cand in path.parent.iterdir():
        if not cand.name.startswith(prefix):
            continue
        pid = cand.name[len(prefix) :]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        shutil.rmtree(cand, ignore_errors=True)
        removed.append(cand)
    return removed


def _write_files(
    tmp: Path, coprocessor: dict[str, Tensor], state: dict[str, Any], optimizer_tensors: dict[str, Tensor] | None
) -> None:
    """Write and fsync the checkpoint's files into ``tmp``; errors name the file being written."""
    meta = {"format": FORMAT}
    target = tmp / COPRO_FILE
    try:
        save_file(_contig(coprocessor), str(target), metadata=meta)
        fsync_file(target)
        if optimizer_tensors:
            target = tmp / OPTIM_FILE
            save_file(_contig(optimizer_tensors), str(target), metadata=meta)
            fsync_file(target)
        target = tmp / STATE_FILE
        text = json.dumps({"format": FORMAT, **state}, indent=1, sort_keys=True)
        write_text_synced(target, text)
    except Exception as e:  # OSError (ENOSPC, EIO), or safetensors' own error type wrapping one
        reason = (e.strerror or str(e)) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{target}: cannot write checkpoint ({reason})") from None
    fsync_dir(tmp, missing_ok=True)


def save_checkpoint(
    path: str | os.PathLike,
    *,
    coprocessor: dict[str, Tensor],
    state: dict[str, Any],
    optimizer_tensors: dict[str, Tensor] | None = None,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically. Returns the path.

    Order: write every file into ``.<name>.tmp-<pid>`` and fsync it; rename the current
    checkpoint to ``.<name>.old``; rename the temp dir to ``name``; fsync the parent; only
    then remove ``.old``. A crash at any point leaves a complete checkpoint at ``name`` or at
    ``.old`` (which :func:`load_checkpoint` falls back to). A failed write (full disk) removes
    the temp dir, keeps the previous checkpoint and raises CheckpointError naming the file.
    """
    path = Path(path)
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{parent}: cannot create the checkpoint directory ({e.strerror or e})") from None
    if path.is_file() or (path.is_dir() and not (path / STATE_FILE).is_file() and any(path.iterdir())):
        # never rename-and-delete something that is not ours (e.g. `cacheaug export CKPT ~/`)
        raise CheckpointError(
            f"{path}: exists and is not a checkpoint directory; refusing to replace it "
            "(expected a new path or an existing checkpoint)"
        )
    remove_stale_temps(path)
    tmp = parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_files(tmp, coprocessor, state, optimizer_tensors)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise CheckpointError(f"{tmp}: cannot write checkpoint ({e.strerror or e})") from None
        raise
    swap_in(tmp, path)
    return path


def swap_in(tmp: Path, path: Path, complete: str = STATE_FILE) -> None:
    """Put the finished directory ``tmp`` in place as ``path``; the previous checkpoint stays as
    ``.<name>.old`` until the new one is in place, so a crash at any moment leaves one that loads.

    ``complete`` names the file whose presence marks ``path`` as a complete checkpoint: only then is
    an existing ``.old`` redundant. Without it ``.old`` is the last good copy (an interrupted swap)
    and is kept; an empty ``path`` is removed (a non-empty incomplete one raises OSError).
    """
    old = path.parent / f".{path.name}.old"
    if old.exists():
        if (path / complete).is_file():
            shutil.rmtree(old)
        elif path.exists():
            path.rmdir()
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent, missing_ok=True)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The directory to read for ``path``: itself, or its ``.old`` copy after an interrupted swap."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    old = path.parent / f".{path.name}.old"
    if (old / STATE_FILE).is_file() and not path.exists():
        return old
    if path.is_file():
        raise CheckpointError(f"{path}: expected a checkpoint directory, got a file")
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint (expected a directory with {STATE_FILE})")
    raise CheckpointError(f"{path / STATE_FILE}: missing (not a checkpoint directory)")


def _read_tensors(file: Path, check_finite: bool = True) -> dict[str, Tensor]:
    try:
        tensors = load_file(str(file))
    except Exception as e:  # OSError, or safetensors' own error type for a corrupt/truncated file
        raise CheckpointError(f"{file}: unreadable safetensors file ({type(e).__name__}: {e})") from None
    for name, t in tensors.items() if check_finite else ():
        bad = count_nonfinite(t) if t.is_floating_point() else 0
        if bad:
            raise CheckpointError(
                f"{file}: tensor {name!r} holds {bad} NaN/Inf value(s) of {t.numel()}; expected finite values "
                "(a corrupted or diverged checkpoint; load_checkpoint(check_finite=False) skips this check)"
            )
    return tensors


def check_state(state: dict[str, Any], file: Path) -> None:
    """The progress fields of a state.json (``step``, ``loader``) have their types: CheckpointError
    naming ``file`` and the field otherwise (a hand-edited step "abc" fails here, not in int())."""
    step = state.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise CheckpointError(f"{file}: step: expected an integer >= 0, got {step!r}")
    loader = state.get("loader")
    if loader is None:
        return
    if not isinstance(loader, dict):
        raise CheckpointError(f"{file}: loader: expected an object with epoch and index, got {loader!r}")
    for key in ("epoch", "index", "seed"):
        v = loader.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise CheckpointError(f"{file}: loader.{key}: expected an integer >= 0, got {v!r}")


def load_checkpoint(path: str | os.PathLike, *, with_optimizer: bool = True, check_finite: bool = True) -> Checkpoint:
    """Read a checkpoint directory (tensors on the CPU). Raises CheckpointError naming the bad file.

    With ``with_optimizer``, a checkpoint whose state.json records optimizer state must have
    its optimizer.safetensors (a silently reset optimizer would make a resume inexact);
    exported coprocessors (no optimizer section) load with no optimizer tensors. Floating-point
    tensors must be finite (a NaN/Inf names the file and tensor) unless ``check_finite=False``;
    ``step`` and ``loader`` in state.json must be non-negative integers (:func:`check_state`).
    """
    d = resolve_checkpoint(path)
    sfile = d / STATE_FILE
    try:
        with open(sfile, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{sfile}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{sfile}: expected a JSON object")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{sfile}: unknown checkpoint format {state.get('format')!r} (expected {FORMAT!r})")
    check_state(state, sfile)
    cfile = d / COPRO_FILE
    if not cfile.is_file():
        raise CheckpointError(f"{cfile}: missing")
    copro = _read_tensors(cfile, check_finite)
    opt: dict[str, Tensor] = {}
    ofile = d / OPTIM_FILE
    if with_optimizer and "optimizer" in state:
        if not ofile.is_file():
            raise CheckpointError(
                f"{ofile}: missing; {sfile.name} records optimizer state, so the run cannot resume exactly"
            )
        opt = _read_tensors(ofile, check_finite)
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
    if Path(dst).resolve() == ck.path.resolve() or Path(dst).resolve() == Path(src).resolve():
        raise CheckpointError(f"{dst}: is the source checkpoint; export writes a new directory (expected another DST)")
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in ck.coprocessor.items()
    }
    state = {k: v for k, v in ck.state.items() if k not in ("optimizer", "format")}
    state["exported_from"] = str(ck.path)
    out = save_checkpoint(dst, coprocessor=tensors, state=state)
    if note:
        (out / "COMMAND.md").write_text(note, encoding="utf-8")
    return out


def trained_for(decoder: Any, tokenizer: Any = None) -> dict[str, Any]:
    """The state.json fields that record what a coprocessor was trained for (besides its config's
    placement and N_L): ``decoder_identity`` and, when known, ``tokenizer_fingerprint``."""
    out: dict[str, Any] = {"decoder_identity": decoder_identity(decoder)}
    if tokenizer is not None:
        out["tokenizer_fingerprint"] = tokenizer_fingerprint(tokenizer)
    return out


# coprocessor settings a checkpoint's tensors are only meaningful under (the rest is initialisation)
COMPAT_FIELDS = ("placement", "num_latents", "latents", "lora_rank", "center")


def check_compatible(
    ckpt: Checkpoint, decoder: Any = None, tokenizer: Any = None, coprocessor_config: Any = None
) -> None:
    """Refuse to use ``ckpt`` with what it was not trained for; CheckpointError naming its state.json,
    the setting and both values. Checks what is given: ``coprocessor_config`` (a CoprocessorConfig or
    dict: placement, N_L, latent kind, LoRA rank, centring), ``decoder`` (implementation,
    architecture and config hash: ``augment.coprocessor.decoder_identity``) and ``tokenizer``
    (fingerprint). A checkpoint that predates a field (no ``decoder_identity`` /
    ``tokenizer_fingerprint`` recorded) is not checked on it."""
    where = ckpt.path / STATE_FILE
    if coprocessor_config is not None:
        want = coprocessor_config.to_dict() if hasattr(coprocessor_config, "to_dict") else dict(coprocessor_config)
        have = ckpt.coprocessor_config
        for key in COMPAT_FIELDS:
            if key in want and key in have and want[key] != have[key]:
                raise CheckpointError(
                    f"{where}: trained for {key} {have[key]!r}, but the coprocessor it is loaded into has "
                    f"{key} {want[key]!r} (its tensors mean something else there; build the coprocessor from the "
                    "checkpoint's config)"
                )
    saved = ckpt.state.get("decoder_identity")
    if decoder is not None and isinstance(saved, str):
        now = decoder_identity(decoder)
        if now != saved:
            raise CheckpointError(
                f"{where}: trained on decoder {saved}, but this decoder is {now}; pass the model (and "
                f"--decoder-impl) it was trained on (--model {ckpt.state.get('decoder', '?')})"
            )
    fp = ckpt.state.get("tokenizer_fingerprint")
    if tokenizer is not None and isinstance(fp, str):
        now_fp = tokenizer_fingerprint(tokenizer)
        if now_fp != fp:
            raise CheckpointError(
                f"{where}: trained with tokenizer {fp}, but this tokenizer is {now_fp}; pass the tokenizer it "
                "was trained with (--tokenizer, or none for the model's own)"
            )


def coprocessor_from_checkpoint(
    decoder: Any, ckpt: Checkpoint, *, seed: int = 0, device: torch.device | None = None, tokenizer: Any = None
) -> Coprocessor:
    """The coprocessor a checkpoint describes (its config, its trainable tensors) on ``decoder``;
    CheckpointError when ``decoder`` (or ``tokenizer``, when given) is not what it was trained for."""
    check_compatible(ckpt, decoder, tokenizer)
    cop = Coprocessor(decoder, config=CoprocessorConfig.from_dict(ckpt.coprocessor_config), seed=seed)
    cop.load_trainable_state(ckpt.coprocessor)
    return cop if device is None else cop.to(device)


def train_config_of(ckpt: Checkpoint) -> TrainConfig:
    """The TrainConfig a checkpoint was trained with; CheckpointError naming its state.json when
    the section is missing or no longer a valid TrainConfig."""
    try:
        return TrainConfig.from_dict(ckpt.train_config())
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{ckpt.path / STATE_FILE}: train_config: {e}") from None


def coprocessor_config_of(ckpt: Checkpoint) -> CoprocessorConfig:
    """The checkpoint's CoprocessorConfig, checked without building anything; CheckpointError naming
    its state.json when the section is missing or invalid (e.g. a NaN scale_init)."""
    try:
        return CoprocessorConfig.from_dict(ckpt.coprocessor_config)
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{ckpt.path / STATE_FILE}: coprocessor: {e}") from None

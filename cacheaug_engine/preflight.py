"""Checks that run before any model is loaded or any step is taken.

Every bad value gets one ValueError that names the setting (config key and ``--flag``) and
what was expected, so the CLI can print one line and exit 2 before minutes of loading or
training are spent: field types and finiteness of a TrainConfig, ranges the dataclass does
not check, the device name, data paths, a writable output directory, and which settings a
``--resume`` may change.

Resume policy (``RESUME_MAY_CHANGE``): the run length and cadence (steps, stop_after,
eval_every, eval_seqs, save_every), where and how it runs (out, device, threads,
grad_checkpoint) and the optimizer's hyper-parameters (lr, min_lr_ratio, warmup,
weight_decay, clip, soft_lr_mult: the schedule continues from the resumed step with the new
values) may change. Everything else (coprocessor shape and init, data, tokenizer, model,
sequence layout, seed, held-out split) fixes tensor shapes or the data stream; a difference
is refused with every differing key and both values, so state.json never records settings
that the saved tensors do not have. ``init_from`` is ignored on resume (the checkpoint's
own weights are continued).
"""

from __future__ import annotations

import math
import os
import tempfile
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import torch

RESUME_MAY_CHANGE = frozenset(
    {
        "steps", "stop_after", "eval_every", "eval_seqs", "save_every", "out", "device", "threads",
        "grad_checkpoint", "init_from", "lr", "min_lr_ratio", "warmup", "weight_decay", "clip", "soft_lr_mult",
        "distributed", "dist_timeout",  # ddp <-> fsdp share the checkpoint format; batch_size: see train()
    }
)
MAX_LR = 1e6


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


def _at_least(cfg: Any, name: str, low: float, *, optional: bool = False) -> None:
    v = getattr(cfg, name)
    if optional and v is None:
        return
    if not v >= low:
        raise ValueError(f"{flag(name)}: expected >= {low}{' (or unset)' if optional else ''}, got {v!r}")


def _positive(cfg: Any, name: str, *, optional: bool = False) -> None:
    v = getattr(cfg, name)
    if optional and v is None:
        return
    if not v > 0:
        raise ValueError(f"{flag(name)}: expected a number > 0{' (or unset)' if optional else ''}, got {v!r}")


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


def check_data_files(paths: list[str], what: str = "data (--data)") -> None:
    """Each path is an existing file (a directory or a missing path is named as such)."""
    for p in paths:
        path = Path(p)
        if path.is_dir():
            raise ValueError(f"{what}: {path} is a directory; expected text (.txt) or .jsonl files")
        if not path.is_file():
            raise FileNotFoundError(f"{what}: {path}: no such file (expected a text or .jsonl file)")


def check_train_config(cfg: Any) -> None:
    """Types, finiteness and the ranges of a TrainConfig that its own ``validate`` leaves out."""
    check_field_types(cfg)
    for name in ("seq_len", "batch_size", "grad_accum", "steps", "num_latents", "ahead", "positions", "eval_seqs"):
        _at_least(cfg, name, 1)
    for name in ("warmup", "eval_every", "save_every", "lora_rank", "seed"):
        _at_least(cfg, name, 0)
    _at_least(cfg, "stop_after", 0, optional=True)  # 0: build/resume the coprocessor, take no step
    for name in ("threads", "max_chars"):
        _at_least(cfg, name, 1, optional=True)
    for name in ("lr", "soft_lr_mult"):
        _positive(cfg, name)
    if cfg.lr * cfg.soft_lr_mult > MAX_LR or cfg.lr > MAX_LR:  # AdamW's fp32 step size overflows near 1e38
        raise ValueError(
            f"{flag('lr')}: expected lr and lr * soft_lr_mult <= {MAX_LR:g}, got lr={cfg.lr!r}, "
            f"soft_lr_mult={cfg.soft_lr_mult!r}"
        )
    for name in ("lora_alpha", "scale_init"):
        _positive(cfg, name, optional=True)
    for name in ("weight_decay", "clip", "contrast", "contrast_margin"):
        if hasattr(cfg, name):
            _at_least(cfg, name, 0)
    if not 0 <= cfg.heldout_frac < 1:
        raise ValueError(f"{flag('heldout_frac')}: expected a fraction in [0, 1), got {cfg.heldout_frac!r}")
    check_device(cfg.device, flag("device"))


def check_run_inputs(cfg: Any) -> Path:
    """What a run reads and writes, checked before the model is loaded: the data files exist and
    are files, ``out`` is a writable directory (returned)."""
    if cfg.data:
        check_data_files(cfg.data, flag("data"))
    return probe_writable_dir(cfg.out, flag("out"))


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


def resume_differences(saved: dict[str, Any], cfg: Any) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) for every setting that may not change on resume."""
    now = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    defaults = {f.name: f.default for f in fields(cfg) if f.default is not MISSING}
    out = []
    for key in sorted(set(now) | set(saved)):
        if key in RESUME_MAY_CHANGE:
            continue
        # a key the checkpoint predates counts as its default value
        a, b = saved.get(key, defaults.get(key, "<unset>")), now.get(key, "<unset>")
        if a != b:
            out.append((key, a, b))
    return out


def check_resume(saved: dict[str, Any], cfg: Any, source: str | os.PathLike) -> None:
    """Refuse a resume whose settings differ from the checkpoint's in anything outside
    ``RESUME_MAY_CHANGE``; the message lists each differing key with both values."""
    diffs = resume_differences(saved, cfg)
    if diffs:
        items = "; ".join(f"{flag(k)}: checkpoint {a!r}, now {b!r}" for k, a, b in diffs)
        raise ValueError(
            f"--resume: {source} was trained with other settings ({items}); pass the checkpoint's values "
            f"or start a new run in another --out (only {', '.join(sorted(RESUME_MAY_CHANGE))} may change)"
        )


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


def eval_ahead_range(seq_len: int) -> tuple[int, int]:
    """Valid N_A for evaluating sequences of ``seq_len`` tokens: at least 8 context tokens before a point."""
    return 1, max(seq_len - 8, 1)

"""Command-line pieces the subcommands share: ``UsageError`` and TrainConfig <-> argparse.

cli/train.py and cli/demo.py both use these; keeping them here means neither of those
imports the other. The train/demo flags are derived from TrainConfig's fields
(train/config.py): a field added there gets its ``--flag`` with no edit here.
"""

from __future__ import annotations

import argparse
import json
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from cacheaug_engine.train.config import TrainConfig


class UsageError(Exception):
    """A bad command-line value (reported as one line, exit code 2)."""


def _flag_type(annotation: Any) -> tuple[type, bool]:
    """(scalar type, is a list) of a TrainConfig annotation: int, float, str, bool, ``X | None``, ``list[X]``."""
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args:  # X | None
        annotation = args[0]
    if annotation not in (int, float, str, bool):
        raise TypeError(f"TrainConfig field type {annotation!r} has no command-line form")
    return annotation, False


def add_train_flags(p: argparse.ArgumentParser, *, config_cls: type = TrainConfig) -> None:
    """One ``--flag-name`` per field of ``config_cls`` (TrainConfig), derived from the dataclass.

    Flag name, type, help, choices and metavar come from the field (see ``train_config.setting``),
    so a field added to TrainConfig gets its flag here with no edit. Every flag defaults to None,
    meaning "take the config file's / built-in value" (:func:`train_config_from_args`).
    Also adds ``--config`` and ``--no-progress``, which are not settings of the run.
    """
    p.add_argument("--config", metavar="JSON", help="JSON file with TrainConfig keys (flags override it)")
    hints = typing.get_type_hints(config_cls)
    for f in fields(config_cls):
        typ, is_list = _flag_type(hints[f.name])
        name = "--" + f.name.replace("_", "-")
        meta = f.metadata
        kw: dict[str, Any] = {"default": None, "help": meta.get("help") or None}
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = typ
            if meta.get("choices"):
                kw["choices"] = list(meta["choices"])
            if meta.get("metavar"):
                kw["metavar"] = meta["metavar"]
            if is_list:
                kw["nargs"] = "+"
        p.add_argument(name, dest=f.name, **kw)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def train_config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> TrainConfig:
    """TrainConfig from built-ins < ``base`` < --config file < explicit flags."""
    values: dict[str, Any] = dict(base or {})
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"--config: no such file: {path}")
        try:
            loaded = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UsageError(f"--config: {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"--config: {path} must hold a JSON object")
        values.update(loaded)
    for f in fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    try:
        cfg = TrainConfig.from_dict(values)
        cfg.validate()
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    return cfg

"""The train/demo flags are derived from TrainConfig: one flag per field, one field per flag."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

import pytest

from cacheaug_engine.cli.args import add_train_flags, train_config_from_args
from cacheaug_engine.cli.main import build_parser
from cacheaug_engine.train.config import TrainConfig, setting

NOT_SETTINGS = {"config", "no_progress"}  # flags of the command, not fields of the run
OWN_FLAGS = {  # subcommand-only flags besides the TrainConfig ones
    "train": {"resume"},
    "demo": {"from_scratch", "prompt", "max_new_tokens", "eval_ahead", "task", "problems", "shots"},
}


def _parse(command: str, argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args([command, *argv])


@pytest.mark.parametrize("command", ["train", "demo"])
def test_every_field_has_a_flag_and_every_flag_a_field(command):
    dests = set(vars(_parse(command, [])))  # every flag's destination, all None / defaults
    settings = dests - {"command", "func"} - NOT_SETTINGS - OWN_FLAGS[command]
    assert settings == {f.name for f in fields(TrainConfig)}


def test_every_field_has_help():
    missing = [f.name for f in fields(TrainConfig) if not f.metadata.get("help")]
    assert missing == []


def test_flags_parse_to_the_config():
    args = _parse(
        "train",
        [
            "--seq-len",
            "64",
            "--lr",
            "0.5",
            "--data",
            "a.txt",
            "b.txt",
            "--placement",
            "early",
            "--lora-alpha",
            "4",
            "--grad-checkpoint",
            "--init-from",
            "ck",
        ],
    )
    cfg = train_config_from_args(args)
    assert (cfg.seq_len, cfg.lr, cfg.data, cfg.placement, cfg.lora_alpha) == (64, 0.5, ["a.txt", "b.txt"], "early", 4.0)
    assert cfg.grad_checkpoint is True and cfg.init_from == "ck"
    untouched = train_config_from_args(_parse("train", []))
    assert untouched == TrainConfig()  # no flag given: every built-in default
    assert train_config_from_args(_parse("train", ["--no-grad-checkpoint"])).grad_checkpoint is False


def test_choices_come_from_the_field(capsys):
    with pytest.raises(SystemExit):
        _parse("train", ["--placement", "late"])
    assert "invalid choice" in capsys.readouterr().err


def test_a_new_field_gets_its_flag_for_free():
    @dataclass
    class Extended(TrainConfig):
        warmup_frac: float | None = setting(None, "a new setting")
        tags: list[str] = setting(help="labels", factory=list)
        fused: bool = setting(False, "a switch")

    p = argparse.ArgumentParser()
    add_train_flags(p, config_cls=Extended)
    args = p.parse_args(["--warmup-frac", "0.25", "--tags", "x", "y", "--fused"])
    assert (args.warmup_frac, args.tags, args.fused) == (0.25, ["x", "y"], True)
    assert "--warmup-frac WARMUP_FRAC" in p.format_help() and "a new setting" in p.format_help()


def test_unsupported_field_type_is_refused():
    @dataclass
    class Bad(TrainConfig):
        table: dict = setting(None, "no command-line form")

    with pytest.raises(TypeError, match="no command-line form"):
        add_train_flags(argparse.ArgumentParser(), config_cls=Bad)

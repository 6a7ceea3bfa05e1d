"""Shared setup of the reliability suite (tests/test_reliability_*.py, tests/test_kill9.py).

A tiny random decoder (``random:<config.json>``, vocab = the byte tokenizer's 259), a text
file, and the common ``cacheaug train`` flags for a run of a few seconds on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from model_fixtures import tiny_config

TEXT = "\n\n".join(f"Line {i}: cache augmentation appends latent embeddings to the KV cache." for i in range(300))


def write_tiny_setup(d: Path) -> list[str]:
    """Write ``d/tiny.json`` and ``d/text.txt``; return the common train flags using them."""
    d.mkdir(parents=True, exist_ok=True)
    c = tiny_config("llama")
    c.vocab_size = 259
    (d / "tiny.json").write_text(json.dumps(c.to_dict()))
    (d / "text.txt").write_text(TEXT)
    return [
        "--model", f"random:{d / 'tiny.json'}", "--tokenizer", "bytes", "--data", str(d / "text.txt"),
        "--seq-len", "40", "--batch-size", "2", "--num-latents", "2", "--ahead", "3", "--positions", "4",
        "--lora-rank", "2", "--heldout-frac", "0.2", "--device", "cpu", "--no-progress", "--warmup", "1",
    ]


class ModelLoaded(AssertionError):
    """Raised by the patched loaders: a bad input was found only after a model load began."""


def forbid_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every decoder load path raise ModelLoaded (models.loaders.load_model as every module binds it,
    models.load_decoder and Decoder.from_config)."""
    import cacheaug_engine.models as models
    import cacheaug_engine.models.loaders as loaders
    import cacheaug_engine.train.trainer as train

    def boom(*a, **k):
        raise ModelLoaded("a model load started before the bad input was reported")

    for mod in (loaders, train):
        monkeypatch.setattr(mod, "load_model", boom)
    monkeypatch.setattr(models, "load_decoder", boom)
    monkeypatch.setattr(loaders, "load_decoder", boom)
    monkeypatch.setattr(models.Decoder, "from_config", classmethod(lambda cls, *a, **k: boom()))


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``cli.main(argv)`` in-process -> (exit code, stderr); argparse's SystemExit becomes its code."""
    from cacheaug_engine.cli.main import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_error(code: int, err: str, *needles: str, exit_code: int = 2) -> None:
    """One ``cacheaug: error:`` line, the exit code, no traceback, each needle in the message."""
    lines = err.strip().splitlines()
    assert code == exit_code, (code, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("cacheaug: error:") or lines[0].startswith("cacheaug "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])

"""The ``cacheaug`` command line: one module per command; ``main`` parses and dispatches."""

from __future__ import annotations

from cacheaug_engine.cli.main import build_parser, main

__all__ = ["build_parser", "main"]

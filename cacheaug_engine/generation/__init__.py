"""Generation: one decoding path (batched; a single prompt is a batch of one), device-side sampling,
and latents computed once per prompt (``latents``: the paper's offline mode)."""

from __future__ import annotations

from cacheaug_engine.generation.generate import STEP_MODES, Generation, generate
from cacheaug_engine.generation.latents import AugmentHandle, augment, load_latents, save_latents

__all__ = ["STEP_MODES", "AugmentHandle", "Generation", "augment", "generate", "load_latents", "save_latents"]

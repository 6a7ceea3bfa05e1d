"""lm-evaluation-harness model "cacheaug": score a coprocessor on the benchmarks the field uses.

Importing this module registers the model (lm-eval has no entry-point discovery)::

    import cacheaug_engine.integrations.lm_eval  # noqa: F401  (registers "cacheaug")
    import lm_eval
    lm_eval.simple_evaluate(model="cacheaug", tasks=["cacheaug_arith3"],
                            model_args="augment=coprocessor,coprocessor=path/to/ckpt")

or ``cacheaug lm-eval --tasks ...`` (every method in one command, paired differences).

model_args:
    pretrained: the decoder: "default" (SmolLM2-135M), a HF model dir, a .gguf file, or
        "random:<config.json>" (tests); a ``models.Decoder`` object when built in Python.
    tokenizer: a tokenizer path or "bytes" (default: the model's own).
    augment: none | coprocessor | pause | shuffled | mean (``generation.augmented_lm.METHODS``).
    coprocessor: a coprocessor checkpoint dir (coprocessor, shuffled, mean).
    pause: a pause-table checkpoint dir (augment=pause).
    batch_size: distinct contexts per batch (int; "auto" is not supported).
    device: "auto" | "cpu" | "cuda[:i]".
    dtype: "float32" (default) | "bfloat16" | "float16": the autocast dtype of every pass
        (weights stay as loaded).
    max_length: the longest sequence (context + latents + continuation); default: the model's
        max_position_embeddings. Longer contexts are cut from the left.

The cache is augmented once after each context; requests that share a context share one
augmented prompt cache, and all of its continuations are scored in one batched pass.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from cacheaug_engine.generation.augmented_lm import METHODS, NEEDS, AugmentedLM

DTYPES = {"float32": None, "fp32": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# (request strings or None, context tokens, continuation tokens)
TokenRequest = tuple[Any, list[int], list[int]]


def _check_args(augment: str, coprocessor: Any, pause: Any, batch_size: Any, dtype: Any) -> int:
    """Every model_arg checked before anything is loaded; returns the batch size."""
    if augment not in METHODS:
        raise ValueError(f"augment: expected one of {', '.join(METHODS)}, got {augment!r}")
    if NEEDS[augment] == "coprocessor" and coprocessor is None:
        raise ValueError(f"augment={augment} needs coprocessor=<checkpoint dir>")
    if augment == "pause" and pause is None:
        raise ValueError("augment=pause needs pause=<pause-table checkpoint dir>")
    if augment == "none" and (coprocessor is not None or pause is not None):
        raise ValueError("augment=none scores the decoder alone: drop coprocessor= / pause= (or pick a method)")
    if str(dtype) not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        bs = int(batch_size)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size: expected an int >= 1 ('auto' is not supported), got {batch_size!r}") from None
    if bs < 1 or isinstance(batch_size, bool):
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    return bs


def _load_latents(spec: Any, decoder: Any, device: torch.device, what: str) -> Any:
    """A coprocessor (or pause table) from a checkpoint dir, or the module itself when given one."""
    if isinstance(spec, torch.nn.Module):
        return spec
    from cacheaug_engine.train.checkpoint import coprocessor_config_of, coprocessor_from_checkpoint, load_checkpoint

    ck = load_checkpoint(str(spec), with_optimizer=False)
    cfg = coprocessor_config_of(ck)
    if (cfg.latents == "pause") != (what == "pause"):
        kinds = ("a pause table", "a coprocessor")
        kind, want = kinds if cfg.latents == "pause" else kinds[::-1]
        raise ValueError(f"{what}: {spec} holds {kind} (expected {want})")
    return coprocessor_from_checkpoint(decoder, ck, device=device)


@register_model("cacheaug")
class CacheAugLM(TemplateLM):
    """lm-eval model over a frozen decoder, optionally augmented by a coprocessor or a control."""

    def __init__(
        self, pretrained: Any = "default", coprocessor: Any = None, augment: str = "none", pause: Any = None,
        batch_size: Any = 8, device: str | None = "auto", dtype: str = "float32", tokenizer: Any = None,
        max_length: int | None = None, **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"unknown model_args for cacheaug: {', '.join(sorted(kwargs))}")
        from cacheaug_engine.checks import check_int
        from cacheaug_engine.data.text import load_tok
        from cacheaug_engine.device import pick_device
        from cacheaug_engine.models.loaders import load_model

        self._batch_size = _check_args(augment, coprocessor, pause, batch_size, dtype)
        if max_length is not None:
            check_int(max_length, "max_length", 2)
        dev = pick_device(device or "auto")
        if isinstance(pretrained, torch.nn.Module):
            decoder = pretrained.to(dev)
            if tokenizer is None:
                raise ValueError("tokenizer: pass a tokenizer object with a Decoder object as pretrained")
            tok = tokenizer
        else:
            spec = str(pretrained)
            tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, str) else load_tok(tokenizer, spec)
            decoder = load_model(spec, dev)
        latents = None
        if augment == "pause":
            latents = _load_latents(pause, decoder, dev, "pause")
        elif augment != "none":
            latents = _load_latents(coprocessor, decoder, dev, "coprocessor")
        self.model = AugmentedLM(decoder, augment, latents, autocast_dtype=DTYPES[str(dtype)])
        self.tok = tok
        self.seconds = 0.0  # wall time spent in the request methods (model work, no lm-eval overhead)
        self._device = dev
        self._max_length = int(max_length or decoder.cfg.max_position_embeddings)
        if self._max_length <= self.model.tail + 1:
            raise ValueError(f"max_length {self._max_length} leaves no room after the {self.model.tail} latent rows")

    # -- lm-eval properties -------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        """End-of-text id (the tokenizer's, else the decoder config's)."""
        from cacheaug_engine.data.text import eos_id

        eid = eos_id(self.tok, self.model.decoder.cfg.eos_token_id)
        if eid is None:
            raise ValueError("the tokenizer and the decoder config name no end-of-text token")
        return int(eid)

    @property
    def max_length(self) -> int:
        """Longest sequence: context + latent rows + continuation."""
        return self._max_length

    @property
    def batch_size(self) -> int:
        """Distinct contexts per batch."""
        return self._batch_size

    @property
    def device(self) -> torch.device:
        """The decoder's device."""
        return self._device

    @property
    def tokenizer_name(self) -> str:
        """A stable name of the tokenizer (lm-eval's request cache key)."""
        from cacheaug_engine.data.text import tokenizer_fingerprint

        return tokenizer_fingerprint(self.tok)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string`` (the tokenizer's own special-token handling)."""
        from cacheaug_engine.data.text import encode

        return encode(self.tok, string)

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        """Text of ``tokens``."""
        from cacheaug_engine.data.text import decode

        return decode(self.tok, list(tokens))

    # -- log-likelihoods ----------------------------------------------------------------------------
    def _truncate(self, ctx: list[int], cont: list[int]) -> list[int]:
        """Cut the context from the left so context + latent rows + continuation fit max_length."""
        if not cont:
            raise ValueError("loglikelihood: empty continuation (nothing to score)")
        room = self.max_length - self.model.tail - len(cont) + 1
        if room < 1:
            raise ValueError(f"loglikelihood: a continuation of {len(cont)} tokens does not fit max_length "
                             f"{self.max_length} with {self.model.tail} latent rows")
        return ctx[-room:]

    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of log-probs, greedy?) per request; requests with the same context share one augmented
        prompt cache, and each batch of contexts is scored in one pass."""
        t0 = time.perf_counter()
        items = [(req, self._truncate(list(ctx), list(cont)), list(cont)) for req, ctx, cont in requests]
        members: dict[tuple[int, ...], list[int]] = {}
        for i, (_, ctx, _) in enumerate(items):
            members.setdefault(tuple(ctx), []).append(i)
        # one representative per context, longest context first (lm-eval's Collator does the grouping)
        coll = Collator(items, sort_fn=lambda x: (-len(x[1]), tuple(x[1])), group_fn=lambda x: x[1],
                        group_by="contexts")
        batches = [list(b) for b in coll.get_batched(n=self.batch_size)]
        self.model.begin([it[1] for b in batches for it in b])
        out: list[tuple[float, bool] | None] = [None] * len(items)
        for batch in tqdm(batches, desc="cacheaug loglikelihood", disable=disable_tqdm):
            rows = [it[1] for it in batch]
            idx = [members[tuple(r)] for r in rows]
            scores = self.model.score(rows, [[items[j][2] for j in js] for js in idx])
            for js, res in zip(idx, scores, strict=True):
                for j, r in zip(js, res, strict=True):
                    out[j] = r
                    if items[j][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", items[j][0], r)
        assert all(r is not None for r in out)
        self.seconds += time.perf_counter() - t0
        return [r for r in out if r is not None]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of max_length (augmented after each window's
        context, like every other context)."""
        windows: list[tuple[int, TokenRequest]] = []
        for i, req in enumerate(requests):
            (string,) = req.args
            toks = self.tok_encode(string)
            spans = get_rolling_token_windows(token_list=toks, prefix_token=self.prefix_token_id,
                                              max_seq_len=self.max_length - self.model.tail, context_len=1)
            windows.extend((i, (None, ctx, cont)) for ctx, cont in map(make_disjoint_window, spans))
        scores = self._loglikelihood_tokens([w for _, w in windows], disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for (i, _), (ll, _) in zip(windows, scores, strict=True):
            totals[i] += ll
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ---------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Batched generation (greedy unless do_sample) with per-request stop strings and max_gen_toks."""
        t0 = time.perf_counter()
        args = [req.args for req in requests]
        coll = Collator(args, sort_fn=lambda x: (-len(self.tok_encode(x[0])), x[0]), group_fn=lambda x: x[1],
                        group_by="gen_kwargs")
        eos_text = self.tok_decode([self.eot_token_id])
        batches = []
        for batch in coll.get_batched(n=self.batch_size):
            batch = list(batch)
            kw = normalize_gen_kwargs(batch[0][1], 256)
            max_gen = int(kw["max_gen_toks"])
            room = self.max_length - self.model.tail - max_gen
            if room < 1:
                raise ValueError(f"generate_until: max_gen_toks {max_gen} + {self.model.tail} latent rows "
                                 f"leave no room for a context in max_length {self.max_length}")
            distinct = list(dict.fromkeys(c for c, _ in batch))  # repeated contexts decode once
            rows = [self.tok_encode(c)[-room:] or [self.prefix_token_id] for c in distinct]
            batches.append((batch, kw, distinct, rows))
        self.model.begin([r for *_, rows in batches for r in rows])
        res: list[str] = []
        for batch, kw, distinct, rows in tqdm(batches, desc="cacheaug generate_until", disable=disable_tqdm):
            until = handle_stop_sequences(kw.pop("until", None), eos=eos_text or None)
            max_gen = int(kw.pop("max_gen_toks"))
            temperature = float(kw.pop("temperature", 0.0) or 0.0) if kw.pop("do_sample", False) else 0.0
            stops = [s for s in until if s]

            def stop(i: int, toks: list[int], stops: list[str] = stops) -> bool:
                text = self.tok_decode(toks)
                return any(s in text for s in stops)

            new = self.model.generate(rows, max_new_tokens=max_gen, stop=stop, eos_id=self.eot_token_id,
                                      temperature=temperature, seed=int(kw.pop("seed", 0) or 0))
            texts = {c: postprocess_generated_text(self.tok_decode(t), until, None)
                     for c, t in zip(distinct, new, strict=True)}
            for c, g in batch:
                res.append(texts[c])
                self.cache_hook.add_partial("generate_until", (c, g), texts[c])
        self.seconds += time.perf_counter() - t0
        return coll.get_original(res)

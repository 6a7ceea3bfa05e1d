"""The coprocessor: reads a frozen decoder's KV cache, writes N_L latent embeddings.

Same architecture as the decoder, initialised from its weights: either a full trainable
copy, or LoRA adapters on the decoder's own (shared, frozen) weights. Its input is a
trainable table of N_L soft tokens; for every augmentation point p_k it runs those soft
tokens as one block over the decoder's cache prefix (``Decoder.forward_blocks``) and the
last layer's normalised hidden states, times an optional latent scale, are the latents.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from cacheaug_engine.checks import check_field_types

from ..models.cache import KVCache
from ..models.protocol import DecoderLike
from .layout import PLACEMENTS, BlockLayout, layout_for
from .lora import DEFAULT_TARGETS, LoRALinear, add_lora, shared_clone

SCALE_MODES = ("none", "fixed", "learned")
SOFT_INITS = ("stats", "tokens")
LATENT_KINDS = ("coprocessor", "pause")
# LoRA targets: the separate projections, plus the fused ones of some transformers models (Phi-3)
LORA_TARGETS = (*DEFAULT_TARGETS, "qkv_proj", "gate_up_proj")


@dataclass
class CoprocessorConfig:
    """Settings that define a coprocessor (saved with every checkpoint).

    Attributes:
        num_latents: N_L, latents written per augmentation point.
        lora_rank: None for a full trainable copy, else the LoRA rank.
        lora_alpha: LoRA alpha (default = rank, i.e. scaling 1).
        placement: "paper" or "early" (see augment.layout); latents are trained for one.
        shift_tokens: True (the paper): the tokens after the latents move N_L positions on; False:
            they keep their own positions and the latents take the N_L before them (augment.layout).
            Generation and serving support only True so far and refuse False (``require_shifted``).
        scale_mode: "none" (latents = hidden states), "fixed" or "learned" (one log-scale
            per latent slot) multiplier.
        scale_init: initial multiplier; None = token-embedding RMS / hidden-state RMS, so
            the latents start at the size of ordinary input embeddings.
        soft_init: "stats" (Gaussian with the token embeddings' per-dim mean/std) or
            "tokens" (embeddings of random vocabulary tokens).
        latents: "coprocessor" (latents read the cache) or "pause" (the paper's Pause Token
            control: the soft-token table itself, times the scale, is the latent at every point;
            no coprocessor pass, no adapters).
        center: latents = a trainable constant table (a pause table) + the coprocessor's per-point
            deviation from its mean latent (the batch mean in training, a running mean of it in
            eval), so the constant cannot pass for augmentation and the coprocessor's gradient
            comes only from what varies with the cache.
        decoder: the identity of the decoder it was built on (:func:`decoder_identity`; filled in
            by the Coprocessor); a coprocessor rebuilt on another decoder raises. None (configs
            written before it was recorded): not checked.
    """

    num_latents: int = 8
    lora_rank: int | None = 32
    lora_alpha: float | None = None
    placement: str = "paper"
    shift_tokens: bool = True
    scale_mode: str = "learned"
    scale_init: float | None = None
    soft_init: str = "stats"
    latents: str = "coprocessor"
    center: bool = False
    decoder: str | None = None

    def __post_init__(self) -> None:
        check_field_types(self)  # e.g. a hand-edited state.json: "2" or NaN never reaches the model
        for name in ("lora_alpha", "scale_init"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be a finite number > 0 (or None), got {v!r}")
        if self.num_latents < 1:
            raise ValueError(f"num_latents must be >= 1, got {self.num_latents}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1 (or None for a full copy), got {self.lora_rank}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {self.scale_mode!r}")
        if self.soft_init not in SOFT_INITS:
            raise ValueError(f"soft_init must be one of {SOFT_INITS}, got {self.soft_init!r}")
        if self.latents not in LATENT_KINDS:
            raise ValueError(f"latents must be one of {LATENT_KINDS}, got {self.latents!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CoprocessorConfig:
        """Inverse of to_dict (unknown keys are an error naming them)."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown CoprocessorConfig keys: {', '.join(map(str, unknown))}")
        return cls(**d)


_NOT_ARCHITECTURE = ("bos_token_id", "eos_token_id", "max_position_embeddings")


def decoder_identity(decoder: DecoderLike) -> str:
    """A decoder's identity for checkpoints: its own ``identity()`` when it has one (e.g.
    "transformers:qwen3:<config hash>"), else "<class>:<arch>:<sha256 of its config's architecture
    fields, 16 hex>" (token ids and the position limit left out)."""
    own = getattr(decoder, "identity", None)
    if callable(own):
        return str(own())
    cfg = decoder.cfg
    d = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_ARCHITECTURE}
    digest = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{type(decoder).__name__.lower()}:{getattr(cfg, 'arch', '?')}:{digest}"


def _embedding_weight(decoder: nn.Module) -> Tensor | None:
    for m in decoder.modules():
        if isinstance(m, nn.Embedding):
            return m.weight
    return None


@torch.no_grad()
def _embedding_stats(decoder: DecoderLike, generator: torch.Generator, sample: int = 4096) -> tuple[Tensor, Tensor]:
    """Per-dim mean and std of decoder.embed over random vocabulary tokens (fp32 [d] each)."""
    vocab = decoder.cfg.vocab_size
    ids = torch.randint(0, vocab, (1, min(sample, vocab)), generator=generator).to(decoder.device)
    emb = decoder.embed(ids)[0].float()
    return emb.mean(0), emb.std(0)


class Coprocessor(nn.Module):
    """Maps (decoder cache, augmentation points) to latents [B, N, N_L, d].

    Args:
        decoder: the frozen decoder: an ``nn.Module`` implementing ``models.DecoderLike`` (e.g.
            ``models.Decoder``); never modified. Its module structure is copied (sharing the
            weights) to make the coprocessor's own network, which is driven only through
            ``DecoderLike`` (``forward_blocks``).
        num_latents: N_L (overrides ``config.num_latents`` when config is given too).
        lora_rank: None = full trainable copy of the weights; int = LoRA adapters on the
            decoder's shared weights (nothing copied).
        config: a full :class:`CoprocessorConfig` (other keyword settings are ignored).
        seed: seed for the soft-token and adapter initialisation.
    """

    def __init__(
        self,
        decoder: DecoderLike,
        num_latents: int = 8,
        lora_rank: int | None = None,
        *,
        config: CoprocessorConfig | None = None,
        seed: int = 0,
        **settings: Any,
    ) -> None:
        super().__init__()
        if not isinstance(decoder, nn.Module) or not isinstance(decoder, DecoderLike):
            raise TypeError(
                f"decoder: expected an nn.Module implementing models.DecoderLike, got {type(decoder).__name__}"
            )
        if config is None:
            config = CoprocessorConfig(num_latents=num_latents, lora_rank=lora_rank, **settings)
        ident = decoder_identity(decoder)
        if config.decoder is not None and config.decoder != ident:
            raise ValueError(
                f"decoder: this coprocessor was built on decoder {config.decoder!r}, not on {ident!r} "
                "(another architecture or configuration, or another decoder implementation)"
            )
        config.decoder = ident
        self.config = config
        gen = torch.Generator().manual_seed(seed)
        pause = config.latents == "pause"
        # a pause table has no model: its latents never see the cache
        model = None if pause else shared_clone(decoder)
        if pause:
            pass
        elif config.lora_rank is None:
            self._make_full_copy(model)
        else:
            state = torch.random.get_rng_state()
            torch.manual_seed(seed)
            try:
                add_lora(model, config.lora_rank, config.lora_alpha, LORA_TARGETS)
            finally:
                torch.random.set_rng_state(state)
        self.model: DecoderLike = model
        d = decoder.cfg.hidden_size
        dev = decoder.device
        if config.soft_init == "stats":
            mean, std = _embedding_stats(decoder, gen)
            soft = mean + std * torch.randn(config.num_latents, d, generator=gen).to(mean.device)
        else:
            ids = torch.randint(0, decoder.cfg.vocab_size, (1, config.num_latents), generator=gen).to(dev)
            with torch.no_grad():
                soft = decoder.embed(ids)[0].float()
        self.soft_tokens = nn.Parameter(soft.to(device=dev, dtype=torch.float32))
        if config.center and not pause:
            mean, std = _embedding_stats(decoder, gen)
            base = mean + std * torch.randn(config.num_latents, d, generator=gen).to(mean.device)
            self.base_latents = nn.Parameter(base.to(device=dev, dtype=torch.float32))
            self.register_buffer("latent_mean", torch.zeros(config.num_latents, d, device=dev))
            self.register_buffer("mean_updates", torch.zeros((), device=dev))
        init = config.scale_init
        if init is None and pause:
            init = 1.0  # the table starts at the token embeddings' statistics already
        if init is None:
            init = self._auto_scale(decoder, gen) if config.scale_mode != "none" else 1.0
            config.scale_init = init
        log_scale = torch.full((config.num_latents,), math.log(init), device=dev)
        if config.scale_mode == "learned":
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer(
                "log_scale", log_scale if config.scale_mode == "fixed" else torch.zeros_like(log_scale)
            )

    # -- construction helpers -----------------------------------------------------------------
    @staticmethod
    def _make_full_copy(model: nn.Module) -> None:
        """Give every transformer parameter its own trainable fp32 copy (embeddings and head stay shared).

        ``register_parameter`` on a name the module already holds replaces that parameter (the
        public way to swap one); the clone's other modules, and the decoder, keep the shared one.
        """
        emb = _embedding_weight(model)
        head = getattr(model, "lm_head", None)
        for mod in model.modules():
            if isinstance(mod, nn.Embedding) or mod is head:
                continue
            for name, p in list(mod.named_parameters(recurse=False)):
                if emb is not None and p is emb:
                    continue
                mod.register_parameter(name, nn.Parameter(p.detach().float().clone(), requires_grad=True))

    @staticmethod
    @torch.no_grad()
    def _auto_scale(decoder: DecoderLike, gen: torch.Generator) -> float:
        """Token-embedding RMS / last-hidden-state RMS, measured on a few random tokens."""
        ids = torch.randint(0, decoder.cfg.vocab_size, (1, 32), generator=gen).to(decoder.device)
        emb_rms = decoder.embed(ids).float().pow(2).mean().sqrt()
        out = decoder.prefill(ids, return_hidden=True)
        hid_rms = out[2].float().pow(2).mean().sqrt()
        return float(emb_rms / hid_rms.clamp_min(1e-6))

    # -- parameters ---------------------------------------------------------------------------
    @property
    def num_latents(self) -> int:
        """N_L."""
        return self.config.num_latents

    @property
    def placement(self) -> str:
        """Where the latents go: "paper" or "early"."""
        return self.config.placement

    @property
    def shift_tokens(self) -> bool:
        """Whether the tokens after the latents move N_L positions on (the paper) or keep their own."""
        return self.config.shift_tokens

    @property
    def is_pause(self) -> bool:
        """True for the Pause Token control (constant latents, no coprocessor pass)."""
        return self.config.latents == "pause"

    def adapters(self) -> list[LoRALinear]:
        """The LoRA adapters (empty for a full copy or a pause table)."""
        return [] if self.model is None else [m for m in self.model.modules() if isinstance(m, LoRALinear)]

    def trainable_state(self) -> dict[str, Tensor]:
        """name -> tensor of everything trainable (+ the scale), detached: what a checkpoint stores."""
        out = {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
        out["log_scale"] = self.log_scale.detach()
        if self.config.center and self.model is not None:
            out["latent_mean"], out["mean_updates"] = self.latent_mean.detach(), self.mean_updates.detach()
        return out

    def load_trainable_state(self, state: dict[str, Tensor], strict: bool = True) -> None:
        """Load tensors written by :meth:`trainable_state` (shapes must match)."""
        own = dict(self.named_parameters())
        own["log_scale"] = self.log_scale
        own.update({k: v for k, v in self.named_buffers() if k in ("latent_mean", "mean_updates")})
        missing = [k for k in self.trainable_state() if k not in state]
        unexpected = [k for k in state if k not in own]
        if strict and (missing or unexpected):
            raise ValueError(f"coprocessor state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for k, v in state.items():
                if k in own:
                    if own[k].shape != v.shape:
                        raise ValueError(f"coprocessor state {k}: shape {tuple(v.shape)} != {tuple(own[k].shape)}")
                    own[k].copy_(v)

    # -- compute ------------------------------------------------------------------------------
    def scale(self) -> Tensor:
        """The latent multiplier per slot, fp32 [N_L]."""
        return self.log_scale.exp()

    def forward(self, cache: KVCache, layout: BlockLayout) -> Tensor:
        """Latents [B, N, N_L, d] for the blocks of ``layout`` over the decoder's ``cache``."""
        b, n = layout.prefix_lens.shape
        nl = self.num_latents
        if layout.num_latents != nl:
            raise ValueError(f"layout has num_latents={layout.num_latents}, coprocessor has {nl}")
        dtype = cache.k[0].dtype
        if torch.is_autocast_enabled(cache.k[0].device.type):
            dtype = torch.get_autocast_dtype(cache.k[0].device.type)
        if self.model is None:  # pause: the same N_L latents at every point
            z = self.soft_tokens.to(dtype) * self.scale().to(dtype).view(nl, 1)
            return z.view(1, 1, nl, -1).expand(b, n, nl, -1)
        x = self.soft_tokens.to(dtype).unsqueeze(0).expand(b * n, nl, -1).reshape(b, n * nl, -1)
        hidden = self.model.forward_blocks(x, layout.copro_pos, cache, layout.prefix_lens, nl, output="hidden")
        z = hidden.view(b, n, nl, -1) * self.scale().to(hidden.dtype).view(1, 1, nl, 1)
        if not self.config.center:
            return z
        return self.base_latents.to(z.dtype) + z - self._center(z)

    def _center(self, z: Tensor) -> Tensor:
        """The mean latent to subtract: the batch's (training; updates the running mean) or the running one."""
        if not self.training:
            return self.latent_mean.to(z.dtype)
        m = z.float().mean((0, 1))
        with torch.no_grad():
            # exact average over the first 20 updates, then an EMA with momentum 0.05
            w = max(0.05, 1.0 / float(self.mean_updates + 1))
            self.latent_mean.mul_(1 - w).add_(m.detach(), alpha=w)
            self.mean_updates.add_(1)
        return m.to(z.dtype)

    def latents_at(self, cache: KVCache, positions: Tensor, ahead: int = 1) -> Tensor:
        """Latents [B, N, N_L, d] for augmentation points ``positions`` [B, N] (inference helper)."""
        return self.forward(cache, layout_for(self, positions, ahead))


def require_shifted(module: Any, where: str) -> None:
    """Refuse a latents module trained with ``shift_tokens=False`` in ``where``: that path places the
    tokens after the latents N_L positions on (the paper's position ids), which such latents were not
    trained for (a ValueError saying so, before any work)."""
    if module is not None and not getattr(module, "shift_tokens", True):
        raise ValueError(
            f"{where}: this coprocessor was trained with --no-shift-tokens (the tokens after its latents keep "
            "their own positions); this path supports only the paper's shifted positions so far. Evaluate it "
            "with `cacheaug eval` / CacheAugmentationObjective, or train with --shift-tokens"
        )

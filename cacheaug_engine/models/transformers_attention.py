"""The engine's attention registered as a transformers attention implementation ("cacheaug").

transformers (5.x) calls an attention implementation per layer as
``fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)`` with
``module.layer_idx``, grouped KV heads not repeated, and per-layer options (``sliding_window``,
``softcap``) plus any extra keyword the model's forward was given. ``TransformersDecoder``
(transformers_decoder.py) passes one :class:`AttentionPass` as the forward keyword
``cacheaug_pass``; every layer hands its q/k/v to ``AttentionPass.attend`` (which runs
``ops`` plans made once per pass) and gets back the attention output. The masks transformers
would build are replaced by ``None`` (:func:`no_mask`): the pass carries its own masking (block
starts, causality, window), so no dense mask is ever built.

Registering is the documented transformers extension point (``AttentionInterface.register``,
``AttentionMaskInterface.register``); it only adds the name "cacheaug", and only models whose
implementation is set to that name use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

ATTN_NAME = "cacheaug"
PASS_KWARG = "cacheaug_pass"

# Keywords transformers hands every attention implementation that change nothing we compute
# (positions are already in the rotated q/k; caching is the pass's business).
_NEUTRAL = frozenset({"position_ids", "use_cache", "cache_position", "output_attentions", "is_causal"})
# Keywords that carry a per-layer option our ops express.
_EXPRESSED = frozenset({"sliding_window", "softcap"})
_FEATURE_NAMES = {
    "s_aux": "attention sinks (s_aux)", "sinks": "attention sinks", "head_mask": "head masks",
    "attention_chunk_size": "chunked attention", "alibi": "ALiBi position biases",
}


@dataclass(frozen=True)
class LayerCall:
    """What one layer asked for: its index, q/k/v head counts and head dim, and its options."""

    layer: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float | None
    softcap: float | None
    window: int | None


# attend(call, q [B,Hq,S,Dh], k [B,Hkv,S,Dh], v) -> o [B,Hq,S,Dh]
AttendFn = Callable[[LayerCall, Tensor, Tensor, Tensor], Tensor]


@dataclass
class AttentionPass:
    """One forward pass's attention: ``attend`` is called once per layer, in order."""

    attend: AttendFn
    calls: list[LayerCall] = field(default_factory=list)


def unsupported_kwargs(kwargs: dict[str, Any]) -> list[str]:
    """Names (as features) of keyword arguments the engine's attention cannot express."""
    bad = []
    for name, value in kwargs.items():
        if name in _NEUTRAL or name in _EXPRESSED or name == PASS_KWARG or value is None:
            continue
        bad.append(_FEATURE_NAMES.get(name, f"attention keyword {name!r}"))
    return bad


def attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
    scaling: float | None = None, dropout: float = 0.0, **kwargs: Any,
) -> tuple[Tensor, None]:
    """The "cacheaug" attention implementation (called by transformers, one layer at a time).

    Runs only inside a ``TransformersDecoder`` pass (``cacheaug_pass`` keyword); elsewhere, and
    for anything the ops cannot express (dropout, attention sinks, an explicit 4D mask...), it
    raises naming the feature. Returns (o [B, S, Hq, Dh], None) as transformers expects.
    """
    state = kwargs.get(PASS_KWARG)
    if not isinstance(state, AttentionPass):
        raise RuntimeError(
            f"the {ATTN_NAME!r} attention implementation runs only inside cacheaug_engine TransformersDecoder passes; "
            "call the original model (its own attention implementation) for anything else"
        )
    bad = unsupported_kwargs(kwargs)
    if dropout:
        bad.append(f"attention dropout ({dropout})")
    if attention_mask is not None:
        bad.append("an explicit attention mask (the pass supplies its own masking)")
    if bad:
        layer = getattr(module, "layer_idx", "?")
        raise ValueError(f"layer {layer}: not expressible by cacheaug ops: {', '.join(bad)}")
    window = kwargs.get("sliding_window")
    call = LayerCall(
        layer=int(module.layer_idx), num_heads=query.shape[1], num_kv_heads=key.shape[1], head_dim=query.shape[3],
        scale=None if scaling is None else float(scaling), softcap=kwargs.get("softcap"),
        window=None if window is None else int(window),
    )
    state.calls.append(call)
    out = state.attend(call, query, key, value)
    return out.transpose(1, 2), None


def no_mask(*args: Any, **kwargs: Any) -> None:
    """Mask builder for "cacheaug": none (the attention pass applies its own masking)."""
    return None


def register() -> str:
    """Register "cacheaug" with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, attention)
    AttentionMaskInterface.register(ATTN_NAME, no_mask)
    return ATTN_NAME

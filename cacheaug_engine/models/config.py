"""DecoderConfig: one dataclass for the decoder families the engine supports.

Llama / SmolLM2 (``llama``), Qwen2 (``qwen2``, q/k/v bias) and Gemma-2 (``gemma2``:
attention and final logit softcap, alternating sliding-window layers, pre+post norms,
RMSNorm with ``(1 + w)``, sqrt(d) embedding scale, GeGLU, tied embeddings,
``query_pre_attn_scalar``). ``DecoderConfig.from_hf`` reads a HF ``config.json`` dict
(transformers 4.x ``rope_theta``/``rope_scaling`` or 5.x ``rope_parameters``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

SUPPORTED_ARCHS = ("llama", "qwen2", "gemma2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
         "gelu": "gelu_tanh"}  # HF Gemma-2 "gelu" checkpoints are run with the tanh approximation too


class PositionRangeWarning(UserWarning):
    """A run uses positions past the model's trained range (``max_position_embeddings``)."""


def warn_past_positions(cfg: Any, positions: int, what: str) -> bool:
    """Warn (PositionRangeWarning, once per call site and length) when ``positions`` exceeds
    ``cfg.max_position_embeddings``: RoPE past the trained range runs but its output degrades.
    Returns whether it warned. ``what`` names the input (e.g. "generate: prompt + latents + new tokens")."""
    limit = getattr(cfg, "max_position_embeddings", None)
    if not isinstance(limit, int) or positions <= limit:
        return False
    warnings.warn(
        f"{what} needs {positions} positions, past the model's trained range (max_position_embeddings = "
        f"{limit}); positions >= {limit} are untrained and the output may degrade",
        PositionRangeWarning, stacklevel=3,
    )
    return True


def heads_fix(heads: int, kv_heads: int, kv_key: str, heads_key: str) -> str:
    """What to change when ``kv_heads`` does not divide ``heads``: the valid KV head counts, or the
    query head counts this KV count would take (GQA groups query heads evenly over KV heads)."""
    divisors = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0)
    multiples = ", ".join(str(kv_heads * m) for m in range(1, 4))
    return f"set {kv_key} to one of {divisors} (the divisors of {heads_key} = {heads}) or {heads_key} to a " \
           f"multiple of {kv_heads} ({multiples}, ...)"


@dataclass
class DecoderConfig:
    """Hyper-parameters of a decoder-only transformer (names follow HF where they exist).

    ``layer_types[i]`` is ``"full"`` or ``"sliding"``; sliding layers only see keys at
    absolute positions > pos - ``sliding_window``. ``rope_scaling`` is ``None`` or a
    dict with ``rope_type`` in ``SUPPORTED_ROPE_TYPES`` and that type's fields.
    """

    arch: str = "llama"
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    norm_offset: float = 0.0  # Gemma RMSNorm multiplies by (1 + w): offset 1.0
    embed_scale: bool = False  # Gemma multiplies input embeddings by sqrt(hidden_size)
    post_norms: bool = False  # Gemma-2: norms after attention and after the MLP as well
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_pre_attn_scalar: float | None = None  # score scale = this ** -0.5 (else head_dim ** -0.5)
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = field(default_factory=tuple)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        self._check_ranges()
        if self.arch not in SUPPORTED_ARCHS:
            raise ValueError(f"arch: unsupported {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
        if self.hidden_act not in ("silu", "gelu_tanh"):
            raise ValueError(f"hidden_act: expected 'silu' or 'gelu_tanh', got {self.hidden_act!r}")
        if not self.layer_types:
            self.layer_types = ("full",) * self.num_layers
        self.layer_types = tuple(self.layer_types)
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types: expected {self.num_layers} entries, got {len(self.layer_types)}")
        if any(t not in ("full", "sliding") for t in self.layer_types):
            raise ValueError(f"layer_types: entries must be 'full' or 'sliding', got {self.layer_types}")
        if "sliding" in self.layer_types and not self.sliding_window:
            raise ValueError("sliding_window: sliding layers need a sliding_window >= 1")
        if self.rope_scaling is not None:
            rtype = self.rope_scaling.get("rope_type", "default")
            if rtype not in SUPPORTED_ROPE_TYPES:
                raise ValueError(
                    f"rope_scaling: unsupported rope_type {rtype!r}; supported: {SUPPORTED_ROPE_TYPES}"
                )

    def _check_ranges(self) -> None:
        """Types and ranges of the numeric fields; each error names the field and what was expected."""
        for name in _POSITIVE_INTS:
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads: must divide num_heads ({self.num_heads}) for grouped-query attention, "
                f"got {self.num_kv_heads}; {heads_fix(self.num_heads, self.num_kv_heads, 'num_kv_heads', 'num_heads')}"
            )
        for name in ("rms_norm_eps", "rope_theta"):
            _check_float(name, getattr(self, name), positive=True)
        _check_float("norm_offset", self.norm_offset, positive=False)
        for name in ("attn_softcap", "final_softcap", "query_pre_attn_scalar"):
            if getattr(self, name) is not None:
                _check_float(name, getattr(self, name), positive=True)
        if self.sliding_window is not None and (not _is_int(self.sliding_window) or self.sliding_window < 1):
            raise ValueError(f"sliding_window: expected None or an integer >= 1, got {self.sliding_window!r}")
        for name in ("bos_token_id",):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v < self.vocab_size):
                raise ValueError(f"{name}: expected None or a token id in [0, {self.vocab_size}), got {v!r}")
        eos = self.eos_token_id
        for v in eos if isinstance(eos, list) else [eos]:
            if v is not None and (not _is_int(v) or not 0 <= v < self.vocab_size):
                raise ValueError(f"eos_token_id: expected None or token ids in [0, {self.vocab_size}), got {eos!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ValueError(f"rope_scaling: expected None or a dict, got {self.rope_scaling!r}")
        if self.rope_scaling is not None and "factor" in self.rope_scaling:
            _check_float("rope_scaling.factor", self.rope_scaling["factor"], positive=True)

    @property
    def attn_scale(self) -> float:
        """Score scale: query_pre_attn_scalar ** -0.5 for Gemma-2, else head_dim ** -0.5."""
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim
        return 1.0 / math.sqrt(base)

    def window(self, layer: int) -> int | None:
        """Sliding window of ``layer`` (None for a full-attention layer)."""
        return self.sliding_window if self.layer_types[layer] == "sliding" else None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable) of every field."""
        d = asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecoderConfig:
        """Inverse of ``to_dict``; unknown keys are an error naming them."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object of DecoderConfig fields, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown DecoderConfig keys: {', '.join(map(str, unknown))} (known: {', '.join(sorted(known))})"
            )
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> DecoderConfig:
        """Build a config from a HF ``config.json`` dict of a Llama, Qwen2 or Gemma-2 model."""
        arch = hf.get("model_type")
        if arch not in SUPPORTED_ARCHS:
            archs = hf.get("architectures")
            raise ValueError(
                f"unsupported model_type {arch!r} (architectures={archs}); "
                f"supported: {', '.join(SUPPORTED_ARCHS)}"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in hf:
                raise ValueError(f"config.json: missing required field {key!r} for {arch!r}")
        hidden = _hf_int(hf, "hidden_size")
        heads = _hf_int(hf, "num_attention_heads")
        kv_heads = _hf_int(hf, "num_key_value_heads") if hf.get("num_key_value_heads") is not None else heads
        if kv_heads < 1 or heads % kv_heads:
            fix = heads_fix(heads, kv_heads, "num_key_value_heads", "num_attention_heads") if kv_heads >= 1 else ""
            raise ValueError(
                f"num_key_value_heads: expected an integer >= 1 dividing num_attention_heads ({heads}), "
                f"got {kv_heads}{'; ' + fix if fix else ''}"
            )
        if hf.get("head_dim") is not None:
            head_dim = _hf_int(hf, "head_dim")
        elif hidden % heads:
            raise ValueError(
                f"hidden_size: expected a multiple of num_attention_heads ({heads}) when head_dim is not given, "
                f"got {hidden}"
            )
        else:
            head_dim = hidden // heads
        kw: dict[str, Any] = dict(
            arch=arch,
            vocab_size=_hf_int(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_hf_int(hf, "intermediate_size"),
            num_layers=_hf_int(hf, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_hf_float(hf, "rms_norm_eps", 1e-6),
            max_position_embeddings=_hf_int(hf, "max_position_embeddings", 8192),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )
        kw["rope_theta"], kw["rope_scaling"] = _rope_from_hf(hf)
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
        if act not in _ACTS:
            raise ValueError(f"config.json: unsupported activation {act!r}; supported: {sorted(_ACTS)}")
        kw["hidden_act"] = _ACTS[act]
        n = kw["num_layers"]
        if arch == "llama":
            bias = bool(hf.get("attention_bias", False))
            kw.update(tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                      qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))
            if "sliding_attention" in (hf.get("layer_types") or []):
                raise ValueError("config.json: sliding-window attention is not supported for llama models")
        elif arch == "qwen2":
            kw.update(tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=True)
            types = hf.get("layer_types")
            if types is None and hf.get("use_sliding_window"):
                mwl = int(hf.get("max_window_layers", n))
                types = ["sliding_attention" if i >= mwl else "full_attention" for i in range(n)]
            if types and "sliding_attention" in types:
                kw["sliding_window"] = hf.get("sliding_window")
            kw["layer_types"] = _layer_types(types, n)
        else:  # gemma2
            # HF Gemma2Config default: even layers (0, 2, ...) local/sliding, odd layers global.
            types = hf.get("layer_types") or [
                "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)
            ]
            kw.update(
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
                qkv_bias=bool(hf.get("attention_bias", False)), o_bias=bool(hf.get("attention_bias", False)),
                norm_offset=1.0, embed_scale=True, post_norms=True,
                attn_softcap=hf.get("attn_logit_softcapping", 50.0),
                final_softcap=hf.get("final_logit_softcapping", 30.0),
                query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
                sliding_window=hf.get("sliding_window", 4096),
                layer_types=_layer_types(types, n),
            )
        return cls(**kw)


_POSITIVE_INTS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
    "max_position_embeddings",
)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_float(name: str, v: Any, *, positive: bool) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)
    if not ok:
        raise ValueError(f"{name}: expected a finite number{' > 0' if positive else ''}, got {v!r}")


def _hf_int(hf: dict[str, Any], key: str, default: int | None = None) -> int:
    """An integer field of config.json (whole floats such as 64.0 accepted), else ValueError naming it."""
    v = hf.get(key, default)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not _is_int(v) or v < 1:
        raise ValueError(f"{key}: expected an integer >= 1, got {v!r}")
    return v


def _hf_float(hf: dict[str, Any], key: str, default: float) -> float:
    v = hf.get(key, default)
    _check_float(key, v, positive=True)
    return float(v)


def check_float_dtype(dtype: Any) -> None:
    """Raise ValueError unless ``dtype`` is a floating torch dtype (weights are never integers)."""
    import torch

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating torch dtype (float32, bfloat16, float16), got {dtype!r}")


def _layer_types(types: list[str] | None, n: int) -> tuple[str, ...]:
    if not types:
        return ("full",) * n
    out = []
    for t in types:
        if t not in ("full_attention", "sliding_attention"):
            raise ValueError(f"config.json: unsupported layer type {t!r} in layer_types")
        out.append("sliding" if t == "sliding_attention" else "full")
    return tuple(out)


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from transformers 5 ``rope_parameters`` or 4.x ``rope_theta``/``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or {})
    if hf.get("rope_scaling"):
        params = {**dict(hf["rope_scaling"]), **params}
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    _check_float("rope_theta", theta, positive=True)
    theta = float(theta)
    rtype = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("config.json: partial_rotary_factor != 1 is not supported")
    if rtype == "default":
        return theta, None
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"config.json: unsupported rope_type {rtype!r}; supported: {SUPPORTED_ROPE_TYPES}")
    return theta, {"rope_type": rtype, **params}

"""TransformersDecoder: any transformers causal LM as the engine's frozen decoder (``DecoderLike``).

    from transformers import AutoModelForCausalLM
    from cacheaug_engine.models import TransformersDecoder
    decoder = TransformersDecoder(AutoModelForCausalLM.from_pretrained(local_dir))

The wrapped model is frozen in place (``requires_grad_(False)``, eval mode) and otherwise left as
it is: the wrapper runs a structural copy of it that shares every weight tensor (nothing is
copied) and whose attention implementation is "cacheaug" (transformers_attention.py). Every pass
runs the model's own modules (embeddings, norms, RoPE, MLPs, the lm_head) with the attention
of ``cacheaug_engine.ops`` and our ``KVCache``:

* ``prefill`` / ``extend``: ``segment_attention`` plans (one per pass, shared by every layer);
* ``forward_blocks``: N blocks, block k over ``cache[:p_k]`` - ``segment_attention``, cost
  sum_k S * (p_k + S), never a dense mask;
* ``decode_step`` / ``decode_step_static`` / ``decode_step_shared``: ``decode_attention`` /
  ``cascade_decode`` plans.

At wrap time one short probe runs the model both ways (its own attention and ours) and
compares the logits; it also records each layer's options. Whatever the ops cannot express
(attention sinks, per-layer scales, an output head transform we do not reproduce, a model that
does not route attention through transformers' ``AttentionInterface``...) raises one ValueError
naming the feature, before any pass can give a wrong answer.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from .. import ops
from .cache import KVCache, check_block_inputs
from .decoder import LayerPlans
from .transformers_attention import PASS_KWARG, AttentionPass, LayerCall, register


@dataclass
class TransformersConfig:
    """What the engine needs to know of a wrapped model (the ``cfg`` of ``DecoderLike``).

    ``windows[i]`` is layer i's sliding window (None: full attention), as the model passes it.
    ``config_sha256`` identifies the transformers config (checkpoints record it).
    """

    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    attn_scale: float
    attn_softcap: float | None
    final_softcap: float | None
    logits_scaling: float | None
    windows: tuple[int | None, ...]
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    config_sha256: str

    def window(self, layer: int) -> int | None:
        """Sliding window of ``layer`` (None for a full-attention layer)."""
        return self.windows[layer]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable)."""
        d = asdict(self)
        d["windows"] = list(self.windows)
        return d


def config_sha256(hf_config: Any) -> str:
    """sha256 of a transformers config's JSON (sorted keys; name/path and dtype fields left out)."""
    d = hf_config.to_dict()
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation",
              "attn_implementation", "_attn_implementation_autoset"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _ids_tensor(where: str, ids: Tensor, ndim: int) -> None:
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int32, torch.int64) or ids.dim() != ndim:
        got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"{where}: input_ids must be an int32/int64 tensor with {ndim} dims, got {got}")


class TransformersDecoder(nn.Module):
    """A transformers causal LM (``PreTrainedModel`` with ``get_decoder``) as a frozen ``DecoderLike``.

    Args:
        model: e.g. ``AutoModelForCausalLM.from_pretrained(dir)``; any dtype and device. Frozen in
            place; its own attention implementation is untouched (``model.generate`` keeps working).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from transformers import PreTrainedModel

        if not isinstance(model, PreTrainedModel) or not hasattr(model, "get_decoder"):
            raise TypeError(f"model: expected a transformers PreTrainedModel causal LM, got {type(model).__name__}")
        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError(f"model: encoder-decoder models are not supported ({type(model).__name__})")
        if getattr(model, "hf_device_map", None):
            raise ValueError("model: loaded with a device_map (dispatch hooks); load it on one device instead")
        model.requires_grad_(False)
        model.eval()
        name = register()
        # a structural copy sharing every parameter and buffer tensor (nothing is copied)
        memo: dict[int, Any] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        hf = copy.deepcopy(model, memo)
        hf.set_attn_implementation(name)
        self.hf = hf
        self.attn_backend: str | None = None
        self.cfg = self._probe(model)

    # -- wrap-time probe -------------------------------------------------------------------------
    @torch.no_grad()
    def _probe(self, model: nn.Module) -> TransformersConfig:
        c = model.config
        layers = getattr(self._body, "layers", None)
        n_layers = int(getattr(c, "num_hidden_layers", 0) or (len(layers) if layers is not None else 0))
        t = 8
        ids = (torch.arange(t, device=self.device) * 7 + 3).remainder(self.vocab_size).view(1, t)
        seen: list[LayerCall] = []

        def attend(call: LayerCall, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            seen.append(call)
            zero = torch.zeros(q.shape[0], 1, dtype=torch.long, device=q.device)
            empty = k.new_zeros(k.shape[0], k.shape[1], 0, k.shape[3])
            return cast(Tensor, ops.segment_attention(
                q, k, v, empty, empty, zero, block_len=q.shape[2], softcap=call.softcap, window=call.window,
                scale=call.scale, backend=self.attn_backend,
            ))

        arch = str(getattr(c, "model_type", type(model).__name__))
        try:
            hidden = self._body(input_ids=ids, position_ids=torch.arange(t, device=self.device).view(1, t),
                                use_cache=False, **{PASS_KWARG: AttentionPass(attend)}).last_hidden_state
        except TypeError as e:
            raise ValueError(f"{arch}: its forward does not pass extra keywords through to the attention "
                             f"implementation (transformers' AttentionInterface), so it cannot be wrapped: {e}") from e
        if [s.layer for s in seen] != list(range(n_layers)):
            raise ValueError(
                f"{arch}: attention was not run once per layer through the registered implementation "
                f"(layers seen {[s.layer for s in seen]}, expected {n_layers}): shared-KV or non-standard "
                "attention modules are not supported"
            )
        for feat in ("scale", "softcap", "num_heads", "num_kv_heads", "head_dim"):
            vals = {getattr(s, feat) for s in seen}
            if len(vals) > 1:
                raise ValueError(f"{arch}: per-layer {feat} differs between layers ({sorted(map(str, vals))}); "
                                 "not supported")
        s0 = seen[0]
        cfg = TransformersConfig(
            arch=arch, vocab_size=self.vocab_size, hidden_size=int(hidden.shape[-1]), num_layers=n_layers,
            num_heads=s0.num_heads, num_kv_heads=s0.num_kv_heads, head_dim=s0.head_dim,
            attn_scale=s0.scale if s0.scale is not None else s0.head_dim ** -0.5, attn_softcap=s0.softcap,
            final_softcap=None, logits_scaling=None, windows=tuple(s.window for s in seen),
            bos_token_id=getattr(c, "bos_token_id", None), eos_token_id=getattr(c, "eos_token_id", None),
            config_sha256=config_sha256(c),
        )
        self.cfg = cfg
        # The output head: the lm_head, then whichever transform the config declares that the model
        # really applies (Gemma's final softcap, Granite's logits_scaling), found by comparing with
        # the model's own logits; anything else is an error.
        want = model(input_ids=ids, use_cache=False).logits.float()
        tol = (1e-4 if self.dtype in (torch.float32, torch.float64) else 5e-2) * (1 + float(want.abs().max()))
        softcap, scaling = getattr(c, "final_logit_softcapping", None), getattr(c, "logits_scaling", None)
        options = [(sc, ls) for sc in {softcap, None} for ls in {scaling, None}]
        options.sort(key=lambda o: (o[0] is None, o[1] is None))  # the declared transforms first
        errs = []
        for sc, ls in options:
            cfg.final_softcap = None if sc is None else float(sc)
            cfg.logits_scaling = None if ls in (None, 1, 1.0) else float(ls)
            errs.append(float((self.logits(hidden) - want).abs().max()))
            if errs[-1] <= tol:
                return cfg
        raise ValueError(
            f"{arch}: with cacheaug attention the logits differ from the model's own by {min(errs):.3g} "
            f"(tolerance {tol:.3g}): the model uses a feature the engine does not reproduce "
            "(e.g. attention biases or sinks, or an output-head transform)"
        )

    # -- properties and building blocks --------------------------------------------------------
    @property
    def _body(self) -> nn.Module:
        return cast(nn.Module, self.hf.get_decoder())

    @property
    def vocab_size(self) -> int:
        """Rows of the output embedding."""
        return int(self.hf.get_output_embeddings().weight.shape[0])

    @property
    def lm_head(self) -> nn.Module:
        """The model's output projection (shared with the wrapped model)."""
        return cast(nn.Module, self.hf.get_output_embeddings())

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the weights (caches are allocated in it)."""
        return cast(torch.dtype, self.hf.get_input_embeddings().weight.dtype)

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return cast(torch.device, self.hf.get_input_embeddings().weight.device)

    def identity(self) -> str:
        """What identifies this decoder in a checkpoint: "transformers:<model_type>:<config sha256, 16 hex>"."""
        return f"transformers:{self.cfg.arch}:{self.cfg.config_sha256[:16]}"

    def train(self, mode: bool = True) -> TransformersDecoder:
        """Set this wrapper's flag only: the frozen model stays in eval mode (no dropout)."""
        self.training = mode
        return self

    def embed(self, input_ids: Tensor) -> Tensor:
        """input_ids [B,T] -> [B,T,d] input embeddings (the model's embedding module, scaling included)."""
        return cast(Tensor, self.hf.get_input_embeddings()(input_ids))

    def logits(self, hidden: Tensor) -> Tensor:
        """Final-normed hidden [..., d] -> float32 logits [..., V] (logit scaling and softcap as the model)."""
        out = self.lm_head(hidden).float()
        if self.cfg.logits_scaling is not None:
            out = out / self.cfg.logits_scaling
        c = self.cfg.final_softcap
        return out if c is None else torch.tanh(out / c) * c

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids [B,T] -> float32 logits [B,T,V] (causal, positions 0..T-1)."""
        return cast(Tensor, self.prefill(input_ids)[0])

    def _run(self, x: Tensor, positions: Tensor, attend: Any) -> Tensor:
        """The model body on embeddings x [B,S,d] at positions [B,S] -> final-normed hidden [B,S,d]."""
        def call(c: LayerCall, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return cast(Tensor, attend(c.layer, q, k, v))

        out = self._body(inputs_embeds=x, position_ids=positions.to(torch.long), use_cache=False,
                         **{PASS_KWARG: AttentionPass(call)})
        return cast(Tensor, out.last_hidden_state)

    def _plans(self, plan: Any) -> LayerPlans:
        return LayerPlans(self.cfg, plan)  # type: ignore[arg-type]  # duck-typed cfg: window(i)

    def plan_blocks(
        self, prefix_lens: Tensor, block_len: int, prefix_len: int, *, max_prefix_len: int | None = None,
        prefix_limit: Tensor | None = None, dtype: torch.dtype | None = None,
    ) -> LayerPlans:
        """The segment-attention plan of one pass (every layer reuses it; see Decoder.plan_blocks)."""
        c = self.cfg
        return self._plans(ops.plan_segment_attention(
            prefix_lens, block_len=block_len, prefix_len=prefix_len, head_dim=c.head_dim, dtype=dtype or self.dtype,
            softcap=c.attn_softcap, scale=c.attn_scale, backend=self.attn_backend, max_prefix_len=max_prefix_len,
            prefix_limit=prefix_limit,
        ))

    def plan_decode(
        self, lens: Tensor, kv_capacity: int, max_len: int, dtype: torch.dtype | None = None,
        shared_len: int | None = None,
    ) -> LayerPlans:
        """The decode plan of one step (see Decoder.plan_decode)."""
        c = self.cfg
        return self._plans(ops.plan_decode(
            lens, kv_capacity=kv_capacity, num_q_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim, dtype=dtype or self.dtype, softcap=c.attn_softcap, scale=c.attn_scale,
            backend=self.attn_backend, max_len=max_len, shared_len=shared_len,
        ))

    # -- passes --------------------------------------------------------------------------------
    def _input(self, input_ids: Tensor | None, inputs_embeds: Tensor | None, where: str) -> Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{where}: pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.cfg.hidden_size:
                raise ValueError(f"{where}: inputs_embeds must be [B, T, {self.cfg.hidden_size}], "
                                 f"got {tuple(inputs_embeds.shape)}")
            return inputs_embeds.to(self.dtype)
        assert input_ids is not None
        _ids_tensor(where, input_ids, 2)
        return self.embed(input_ids)

    def prefill(
        self, input_ids: Tensor | None = None, *, inputs_embeds: Tensor | None = None,
        positions: Tensor | None = None, return_hidden: bool = False, capacity: int | None = None,
        logits_at: Tensor | None = None,
    ) -> tuple[Tensor, KVCache] | tuple[Tensor, KVCache, Tensor]:
        """Causal pass over [B,T] -> (float32 logits [B,T,V] (or [B,R,V] at ``logits_at``), KVCache[, hidden]).
        Arguments as ``Decoder.prefill``."""
        x = self._input(input_ids, inputs_embeds, "prefill")
        b, t, d = x.shape
        c = self.cfg
        if logits_at is not None and (logits_at.dim() != 2 or logits_at.shape[0] != b
                                      or logits_at.dtype not in (torch.int32, torch.int64)):
            got = f"{logits_at.dtype} {tuple(logits_at.shape)}"
            raise ValueError(f"logits_at: expected int32/int64 [{b}, R], got {got}")
        if t == 0:
            cache = KVCache.empty(c.num_layers, b, c.num_kv_heads, c.head_dim, capacity or 0, dtype=self.dtype,
                                  device=x.device)
            hidden = x.new_zeros(b, 0, d)
            logits = self._logits_at(hidden, logits_at)
            return (logits, cache, hidden) if return_hidden else (logits, cache)
        if positions is None:
            positions = torch.arange(t, device=x.device).expand(b, t)
        ks: list[Tensor] = []
        vs: list[Tensor] = []
        zero = torch.zeros(b, 1, dtype=torch.long, device=x.device)
        plans = self.plan_blocks(zero, t, 0, max_prefix_len=0, dtype=x.dtype)
        empty = x.new_zeros(b, c.num_kv_heads, 0, c.head_dim)

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            k, v = k.contiguous(), v.contiguous()
            ks.append(k)
            vs.append(v)
            return cast(Tensor, plans.layer(i).run(q, k, v, empty, empty))

        hidden = self._run(x, positions, attend)
        cache = KVCache.from_tensors(ks, vs)
        if capacity is not None:
            cache.reserve(capacity)
        logits = self._logits_at(hidden, logits_at)
        return (logits, cache, hidden) if return_hidden else (logits, cache)

    def _logits_at(self, hidden: Tensor, rows: Tensor | None) -> Tensor:
        if rows is None:
            return self.logits(hidden)
        idx = rows.to(hidden.device, torch.long).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return self.logits(torch.gather(hidden, 1, idx))

    def forward_blocks(
        self, inputs_embeds: Tensor, positions: Tensor, cache: KVCache, prefix_lens: Tensor, block_len: int,
        *, output: str = "logits",
    ) -> Tensor:
        """N blocks of S embeddings [B, N*S, d], block k over the first p_k cache entries of every layer
        and causally itself -> float32 logits [B, N*S, V] or final-normed hidden. As ``Decoder.forward_blocks``."""
        b = check_block_inputs(self.cfg.hidden_size, inputs_embeds, positions, cache, prefix_lens, block_len, output)
        x = inputs_embeds.to(self.dtype)
        plans = self.plan_blocks(prefix_lens, block_len, cache.max_len, prefix_limit=cache.lens, dtype=x.dtype)

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            kp, vp = cache.layer(i)
            kp, vp = kp.to(q.dtype).expand(b, -1, -1, -1), vp.to(q.dtype).expand(b, -1, -1, -1)
            return cast(Tensor, plans.layer(i).run(q, k, v, kp, vp))

        hidden = self._run(x, positions, attend)
        return hidden if output == "hidden" else self.logits(hidden)

    def extend(
        self, input_ids: Tensor | None = None, *, cache: KVCache, inputs_embeds: Tensor | None = None,
        return_hidden: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Append S tokens (ids [B,S] or embeddings [B,S,d]) to ``cache`` in place -> float32 logits [B,S,V]."""
        x = self._input(input_ids, inputs_embeds, "extend")
        b, s, _ = x.shape
        cache.reserve(cache.max_len + s)
        start = cache.lens.view(b, 1)
        positions = start + torch.arange(s, device=x.device)
        plans = self.plan_blocks(start, s, cache.max_len, max_prefix_len=cache.max_len, dtype=x.dtype)

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            kp, vp = cache.layer(i)
            o = cast(Tensor, plans.layer(i).run(q, k, v, kp, vp))
            cache.write(i, k, v)
            return o

        hidden = self._run(x, positions, attend)
        cache.advance(s)
        logits = self.logits(hidden)
        return (logits, hidden) if return_hidden else logits

    def decode_step(
        self, input_ids: Tensor | None, cache: KVCache, *, inputs_embeds: Tensor | None = None
    ) -> Tensor:
        """One token per request (ids [B] or embeddings [B,d]) at position cache.lens[b]; cache advanced -> [B,V]."""
        if inputs_embeds is not None:
            inputs_embeds = inputs_embeds.unsqueeze(1)
        x = self._input(None if input_ids is None else input_ids.view(-1, 1), inputs_embeds, "decode_step")
        cache.reserve(cache.max_len + 1)
        positions = cache.lens.view(-1, 1)
        length = cache.max_len + 1
        plans = self.plan_decode(cache.lens + 1, length, length, dtype=x.dtype)

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            cache.write(i, k, v)
            kc, vc = cache.layer(i, length)
            return cast(Tensor, plans.layer(i).run(q[:, :, 0], kc, vc)).unsqueeze(2)

        hidden = self._run(x, positions, attend)
        cache.advance(1)
        return self.logits(hidden[:, 0])

    def decode_step_static(
        self, input_ids: Tensor, k: list[Tensor], v: list[Tensor], lens: Tensor, plan: object = None
    ) -> Tensor:
        """One token per request over static cache storage (lens not advanced) -> [B,V]. As ``Decoder``."""
        x = self.embed(input_ids.view(-1, 1))
        cap = k[0].shape[2]
        new_lens = lens + 1
        plans = (self.plan_decode(new_lens, cap, cap, dtype=x.dtype) if plan is None
                 else cast(LayerPlans, plan).with_lens(new_lens))
        rows = torch.arange(x.shape[0], device=x.device)

        def attend(i: int, q: Tensor, kn: Tensor, vn: Tensor) -> Tensor:
            k[i][rows, :, lens] = kn[:, :, 0].to(k[i].dtype)
            v[i][rows, :, lens] = vn[:, :, 0].to(v[i].dtype)
            return cast(Tensor, plans.layer(i).run(q[:, :, 0], k[i], v[i])).unsqueeze(2)

        hidden = self._run(x, lens.view(-1, 1), attend)
        return self.logits(hidden[:, 0])

    def decode_step_shared(
        self, input_ids: Tensor, shared_k: list[Tensor], shared_v: list[Tensor], suffix: KVCache
    ) -> Tensor:
        """One token for n requests over a shared prefix ([Hkv,T,Dh] per layer) + own suffixes -> [n,V]."""
        t = shared_k[0].shape[1]
        suffix.reserve(suffix.max_len + 1)
        length = suffix.max_len + 1
        positions = (t + suffix.lens).view(-1, 1)
        plans = self.plan_decode(suffix.lens + 1, length, length, dtype=self.dtype, shared_len=t)

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            suffix.write(i, k, v)
            ks, vs = suffix.layer(i, length)
            return cast(Tensor, plans.layer(i).run_cascade(q[:, :, 0], shared_k[i], shared_v[i], ks, vs)).unsqueeze(2)

        hidden = self._run(self.embed(input_ids.view(-1, 1)), positions, attend)
        suffix.advance(1)
        return self.logits(hidden[:, 0])

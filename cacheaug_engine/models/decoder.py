"""The frozen decoder: one short gpt-fast style implementation for Llama/SmolLM2, Qwen2, Gemma-2.

Every attention goes through ``cacheaug_engine.ops``: whole sequences and blocks over a
prefix cache through ``segment_attention``, one-token steps through ``decode_attention``
(``backend=self.attn_backend``); every projection through ``ops.frozen_linear.FrozenLinear``
(``self.linear_backend``: on the CPU, oneDNN on weights packed once). Parameters are frozen
(requires_grad False); activations stay differentiable, so gradients reach ``inputs_embeds``
and any parameters a wrapper (e.g. LoRA around the ``*_proj`` nn.Linear modules) adds.

Entry points (shapes: B batch, T/S lengths, d hidden, V vocab):

* ``embed(ids [B,T]) -> [B,T,d]`` embeddings as the model feeds them (Gemma: times sqrt(d)).
* ``forward(ids [B,T]) -> [B,T,V]`` float32 logits.
* ``prefill(ids | inputs_embeds, positions) -> (logits, KVCache[, hidden])``.
* ``forward_blocks(embeds [B,N*S,d], positions, cache, prefix_lens [B,N], S)`` - N blocks,
  block k attends to ``cache[:p_k]`` of every layer and causally to itself.
* ``extend(ids | inputs_embeds, cache)`` - append S tokens to a cache (chunked prefill).
* ``decode_step(ids [B] | inputs_embeds [B,d], cache) -> [B,V]`` - one token, cache advanced.
* ``decode_step_shared(ids [n], shared_k, shared_v, suffix) -> [n,V]`` - one token for n requests
  over one shared prefix cache (``ops.cascade_decode``) plus each request's own suffix cache.

What augment/ and generate.py may rely on is the ``DecoderLike`` protocol (models/protocol.py);
this class implements it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cacheaug_engine import ops

from ..ops.frozen_linear import FrozenLinear, check_backend
from .cache import KVCache, check_block_inputs
from .compiled import compiled, gated, rms_norm
from .config import DecoderConfig, check_float_dtype
from .rope import apply_rope, rope_cos_sin

# attend(layer, q [B,Hq,S,Dh], k [B,Hkv,S,Dh], v) -> o [B,Hq,S,Dh]
AttendFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]


class LayerPlans:
    """One attention plan per pass (ops/plan.py), shared by every layer: the index values were
    checked and the backend chosen once; layers with another sliding window (Gemma-2) get the
    same plan with their window (derived once per distinct window, no sync)."""

    def __init__(self, cfg: DecoderConfig, plan: ops.SegmentPlan | ops.DecodePlan) -> None:
        self.cfg = cfg
        self.base = plan
        self._by_window: dict[int | None, Any] = {plan.window: plan}

    def with_lens(self, lens: Tensor) -> LayerPlans:
        """A decode plan's next step (same backend and workspace; ``lens`` vouched for by the caller)."""
        return LayerPlans(self.cfg, self.base.with_lens(lens))

    def layer(self, i: int) -> Any:
        """The plan for layer i."""
        w = self.cfg.window(i)
        p = self._by_window.get(w)
        if p is None:
            p = self._by_window[w] = self.base.with_window(w)
        return p


class RMSNorm(nn.Module):
    """RMSNorm; ``offset=1`` gives Gemma's ``x * (1 + w)`` (computed in float32 like HF)."""

    compiled = False  # models/compiled.py: torch.compile'd region when set

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        fn = compiled(rms_norm) if self.compiled else rms_norm
        return fn(x, self.weight, self.eps, self.offset)


class Attention(nn.Module):
    """Q/K/V/O projections; the attention itself is supplied by the caller (an ``AttendFn``)."""

    compiled = False  # RoPE as a torch.compile'd region when set

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hq, hkv, dh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = FrozenLinear(d, hq * dh, bias=cfg.qkv_bias)
        self.k_proj = FrozenLinear(d, hkv * dh, bias=cfg.qkv_bias)
        self.v_proj = FrozenLinear(d, hkv * dh, bias=cfg.qkv_bias)
        self.o_proj = FrozenLinear(hq * dh, d, bias=cfg.o_bias)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B,S,d] -> q [B,Hq,S,Dh], k, v [B,Hkv,S,Dh] (q, k rotated; k, v contiguous: they are
        the cache. q stays a [B,S,Hq,Dh]-ordered view: every attention backend takes strides.)"""
        b, s, _ = x.shape
        dh = self.cfg.head_dim
        q = self.q_proj(x).view(b, s, -1, dh).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, dh).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, dh).transpose(1, 2)
        rope = compiled(apply_rope) if self.compiled else apply_rope
        return rope(q, cos, sin), rope(k, cos, sin).contiguous(), v.contiguous()


class MLP(nn.Module):
    """Gated MLP: SwiGLU (Llama, Qwen2) or GeGLU with tanh-approximate GELU (Gemma-2)."""

    compiled = False  # the gated activation as a torch.compile'd region when set

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = FrozenLinear(d, f, bias=cfg.mlp_bias)
        self.up_proj = FrozenLinear(d, f, bias=cfg.mlp_bias)
        self.down_proj = FrozenLinear(f, d, bias=cfg.mlp_bias)
        self.gelu = cfg.hidden_act == "gelu_tanh"

    def forward(self, x: Tensor) -> Tensor:
        g, u = self.gate_proj(x), self.up_proj(x)
        if self.compiled:
            return self.down_proj(compiled(gated)(g, u, self.gelu))
        # Without an autograd graph, act and gate in place on the fresh projections (two fewer
        # [.., F] allocations per layer; on the CPU each fresh buffer is page-faulted in, ~2x the op).
        inplace = not (torch.is_grad_enabled() and (g.requires_grad or u.requires_grad))
        g = F.gelu(g, approximate="tanh") if self.gelu else F.silu(g, inplace=inplace)
        return self.down_proj(g.mul_(u) if inplace else g * u)


class Block(nn.Module):
    """One transformer layer: (pre-norm) attention + (pre-norm) MLP, Gemma-2 post-norms optional."""

    def __init__(self, cfg: DecoderConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        if cfg.post_norms:
            self.attn_post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
            self.mlp_post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        self.post_norms = cfg.post_norms

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend: AttendFn) -> Tensor:
        b, s, _ = x.shape
        q, k, v = self.attn.qkv(self.attn_norm(x), cos, sin)
        h = self.attn.o_proj(attend(self.index, q, k, v).transpose(1, 2).reshape(b, s, -1))
        x = x + (self.attn_post_norm(h) if self.post_norms else h)
        h = self.mlp(self.mlp_norm(x))
        return x + (self.mlp_post_norm(h) if self.post_norms else h)


class Decoder(nn.Module):
    """A frozen decoder-only LM. See the module docstring for the API."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn_backend: str | None = None
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        self.lm_head = FrozenLinear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.requires_grad_(False)

    @property
    def linear_backend(self) -> str:
        """The projections' GEMM backend: "auto" (default), "torch" or "onednn" (ops/frozen_linear.py)."""
        return self.lm_head.backend

    @linear_backend.setter
    def linear_backend(self, backend: str) -> None:
        check_backend(backend)
        for m in self.modules():
            if isinstance(m, FrozenLinear):
                m.backend = backend

    # -- construction --------------------------------------------------------------------------
    def tie_weights(self) -> None:
        """Share lm_head.weight with the embedding when the config ties them."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @classmethod
    def from_weights(cls, cfg: DecoderConfig, state: dict[str, Tensor], source: object = None) -> Decoder:
        """A frozen Decoder holding ``state`` (our parameter names); the module is built on the meta
        device so no memory is spent on weights that are replaced at once. A missing or mis-shaped
        tensor raises ValueError, prefixed with ``source`` (e.g. the file it came from)."""
        with torch.device("meta"):
            model = cls(cfg)
        try:
            model.load_weights(state)
        except ValueError as e:
            if source is None:
                raise
            raise ValueError(f"{source}: {e}") from None
        return model

    @classmethod
    def from_config(cls, cfg: DecoderConfig, dtype: torch.dtype = torch.float32, seed: int = 0) -> Decoder:
        """Random weights (for tests): N(0, 0.02) matrices, norm weights and biases jittered."""
        check_float_dtype(dtype)
        gen = torch.Generator().manual_seed(seed)
        with torch.device("meta"):
            model = cls(cfg)
        state = {}
        for name, p in model.state_dict().items():
            if name.endswith("norm.weight"):
                base = 0.0 if cfg.norm_offset else 1.0
                w = base + 0.1 * torch.randn(p.shape, generator=gen)
            elif name.endswith(".bias"):
                w = 0.02 * torch.randn(p.shape, generator=gen)
            else:
                w = 0.02 * torch.randn(p.shape, generator=gen)
            state[name] = w.to(dtype)
        return cls.from_weights(cfg, state)

    def load_weights(self, state: dict[str, Tensor]) -> None:
        """Assign a full state dict (our parameter names), re-tie, freeze. Errors name missing keys."""
        expected = set(self.state_dict().keys())
        if self.cfg.tie_word_embeddings:
            expected.discard("lm_head.weight")
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(
                f"weights do not match the config: missing {sorted(missing)[:8]}, "
                f"unexpected {sorted(unexpected)[:8]}"
            )
        for name, tensor in state.items():
            want = self._shape_of(name)
            if tuple(tensor.shape) != want:
                raise ValueError(f"weight {name}: expected shape {want}, got {tuple(tensor.shape)}")
        self.load_state_dict(state, strict=False, assign=True)
        self.tie_weights()
        self.requires_grad_(False)

    def _shape_of(self, name: str) -> tuple[int, ...]:
        mod_name, _, attr = name.rpartition(".")
        return tuple(getattr(self.get_submodule(mod_name), attr).shape)

    # -- properties ----------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """dtype of the weights."""
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.embed_tokens.weight.device

    def param_count(self, trainable_only: bool = False) -> int:
        """Number of (unique) parameters; tied weights count once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # -- building blocks -----------------------------------------------------------------------
    def embed(self, input_ids: Tensor) -> Tensor:
        """input_ids [B,T] -> [B,T,d] input embeddings as the model feeds them (Gemma: x sqrt(d))."""
        x = self.embed_tokens(input_ids)
        if self.cfg.embed_scale:
            x = x * torch.tensor(math.sqrt(self.cfg.hidden_size), dtype=x.dtype)
        return x

    def logits(self, hidden: Tensor) -> Tensor:
        """Final-normed hidden [..., d] -> float32 logits [..., V] (with the final softcap)."""
        out = self.lm_head(hidden).float()
        c = self.cfg.final_softcap
        return out if c is None else torch.tanh(out / c) * c

    def _run(self, x: Tensor, positions: Tensor, attend: AttendFn) -> Tensor:
        """All layers then the final norm: x [B,S,d] at positions [B,S] -> hidden [B,S,d]."""
        cos, sin = rope_cos_sin(self.cfg, positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attend)
        return self.norm(x)

    def plan_blocks(
        self, prefix_lens: Tensor, block_len: int, prefix_len: int, *, max_prefix_len: int | None = None,
        prefix_limit: Tensor | None = None, dtype: torch.dtype | None = None,
    ) -> LayerPlans:
        """The segment-attention plan of one pass (every layer reuses it): blocks of ``block_len``
        rows starting at ``prefix_lens`` [B, N] over ``prefix_len`` cache entries. Without
        ``max_prefix_len`` the values are checked (against ``prefix_limit`` [B] too) with one read-back."""
        c = self.cfg
        plan = ops.plan_segment_attention(
            prefix_lens, block_len=block_len, prefix_len=prefix_len, head_dim=c.head_dim, dtype=dtype or self.dtype,
            softcap=c.attn_softcap, scale=c.attn_scale, backend=self.attn_backend, max_prefix_len=max_prefix_len,
            prefix_limit=prefix_limit,
        )
        return LayerPlans(c, plan)

    def plan_decode(
        self, lens: Tensor, kv_capacity: int, max_len: int, dtype: torch.dtype | None = None,
        shared_len: int | None = None,
    ) -> LayerPlans:
        """The decode plan of one step: request b attends to its first ``lens[b]`` keys, all
        within ``max_len`` <= ``kv_capacity`` (bounds the caller knows: nothing is read back);
        with ``shared_len`` T, a cascade plan (shared prefix of T keys + per-request suffixes)."""
        c = self.cfg
        plan = ops.plan_decode(
            lens, kv_capacity=kv_capacity, num_q_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim, dtype=dtype or self.dtype, softcap=c.attn_softcap, scale=c.attn_scale,
            backend=self.attn_backend, max_len=max_len, shared_len=shared_len,
        )
        return LayerPlans(c, plan)

    # -- public passes -------------------------------------------------------------------------
    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids [B,T] -> float32 logits [B,T,V] (causal, positions 0..T-1)."""
        return self.prefill(input_ids)[0]

    def prefill(
        self, input_ids: Tensor | None = None, *, inputs_embeds: Tensor | None = None,
        positions: Tensor | None = None, return_hidden: bool = False, capacity: int | None = None,
        logits_at: Tensor | None = None,
    ) -> tuple[Tensor, KVCache] | tuple[Tensor, KVCache, Tensor]:
        """Causal pass over whole sequences, returning logits and the per-layer KV cache.

        Args:
            input_ids: [B,T] token ids, or ``inputs_embeds`` [B,T,d] used as-is.
            positions: long [B,T] RoPE positions (default 0..T-1); the attention mask is
                causal over the T entries regardless.
            return_hidden: also return the final-normed hidden states [B,T,d].
            capacity: preallocate the cache for this many entries (e.g. T + tokens to decode).
            logits_at: long [B,R] positions in [0, T): the lm_head runs on those rows only and
                logits are [B,R,V] (R = 0: none, for callers that want the cache). Default: all T.
                (Out-of-range values raise from the gather; on the CPU they are checked first.)

        Returns (logits float32 [B,T,V] (or [B,R,V]), cache with lens = T[, hidden]).
        """
        x = self._input(input_ids, inputs_embeds, "prefill")
        b, t, _ = x.shape
        if logits_at is not None:
            _check_rows(logits_at, b, t)
        if t == 0:  # an empty prompt: empty logits and an empty cache (with the requested capacity)
            c = self.cfg
            cache = KVCache.empty(
                c.num_layers, b, c.num_kv_heads, c.head_dim, capacity or 0, dtype=self.dtype, device=x.device
            )
            hidden = self.norm(x)
            logits = self._logits_at(hidden, logits_at)
            return (logits, cache, hidden) if return_hidden else (logits, cache)
        if positions is None:
            positions = torch.arange(t, device=x.device).expand(b, t)
        ks: list[Tensor] = []
        vs: list[Tensor] = []
        zero_lens = torch.zeros(b, 1, dtype=torch.long, device=x.device)
        plans = self.plan_blocks(zero_lens, t, 0, max_prefix_len=0, dtype=x.dtype)
        empty = x.new_zeros(b, self.cfg.num_kv_heads, 0, self.cfg.head_dim)

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
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
        """N blocks of S input embeddings, block k over the first p_k cache entries of every layer.

        Args:
            inputs_embeds: [B, N*S, d] used as-is (no lookup, no scaling); gradient flows to it.
            positions: long [B, N*S] RoPE positions (normally p_k + i for row i of block k; the
                sliding window is counted from p_k + i).
            cache: a KVCache with batch B (or 1, shared by all rows); it is only read.
            prefix_lens: int [B, N], p_k <= cache.lens[b].
            block_len: S.
            output: "logits" -> float32 [B, N*S, V]; "hidden" -> final-normed [B, N*S, d].
        """
        b = check_block_inputs(self.cfg.hidden_size, inputs_embeds, positions, cache, prefix_lens, block_len, output)
        x = inputs_embeds.to(self.dtype)
        # One plan for every layer: prefix_lens is checked against [0, cache.lens[b]] with one read-back.
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
        """Append S tokens (ids [B,S] or embeddings [B,S,d], used as-is) to ``cache`` in place.

        Row i of request b sits at position cache.lens[b] + i and attends to the whole cache
        and causally to the new tokens; their K/V are written and lens advances by S.
        Meant for inference (e.g. appending latents); returns float32 logits [B,S,V]
        (and final-normed hidden [B,S,d] if ``return_hidden``).
        """
        x = self._input(input_ids, inputs_embeds, "extend")
        b, s, _ = x.shape
        cache.reserve(cache.max_len + s)
        start = cache.lens.view(b, 1)
        positions = start + torch.arange(s, device=x.device)

        # lens <= max_len is the cache's own invariant: the plan reads nothing back.
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
        """One token per request (ids [B] or embeddings [B,d]) at position cache.lens[b].

        Writes its K/V into the cache at lens[b] (growing capacity if needed), attends via
        ops.decode_attention over [0, lens[b] + 1), advances lens by 1. Returns logits [B,V].
        """
        if inputs_embeds is not None:
            inputs_embeds = inputs_embeds.unsqueeze(1)
        x = self._input(None if input_ids is None else input_ids.view(-1, 1), inputs_embeds, "decode_step")
        cache.reserve(cache.max_len + 1)
        positions = cache.lens.view(-1, 1)
        new_lens = cache.lens + 1
        length = cache.max_len + 1

        plans = self.plan_decode(new_lens, length, length, dtype=x.dtype)  # one plan, no read-back

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            cache.write(i, k, v)
            kc, vc = cache.layer(i, length)
            return cast(Tensor, plans.layer(i).run(q[:, :, 0], kc, vc)).unsqueeze(2)

        hidden = self._run(x, positions, attend)
        cache.advance(1)
        return self.logits(hidden[:, 0])

    def decode_step_static(
        self, input_ids: Tensor, k: list[Tensor], v: list[Tensor], lens: Tensor, plan: LayerPlans | None = None
    ) -> Tensor:
        """One token per request over a static cache: shapes never change from step to step, so the
        step can be captured in a CUDA graph (torch.compile mode="reduce-overhead", see generate.py).

        Args:
            input_ids: [B] tokens at positions lens[b].
            k, v: per layer [B, Hkv, C, Dh] cache storage; the new K/V are written in place at
                lens[b] (the caller guarantees lens[b] < C).
            lens: long [B] valid entries per request; NOT advanced here (the caller adds 1).
            plan: a decode plan from ``plan_decode(lens, C, C)`` made once outside the step (its
                backend and workspace are reused; its lens are replaced by lens + 1).

        Attends over the whole capacity C with per-request lengths (no data-dependent shapes, no
        host reads). Returns float32 logits [B, V].
        """
        x = self.embed(input_ids.view(-1, 1))
        cap = k[0].shape[2]
        new_lens = lens + 1
        plans = self.plan_decode(new_lens, cap, cap, dtype=x.dtype) if plan is None else plan.with_lens(new_lens)
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
        """One token for each of n requests that share one prefix cache and each own a suffix.

        Args:
            input_ids: [n] the requests' current tokens.
            shared_k, shared_v: per layer [Hkv, T, Dh], the shared prefix (e.g. prompt + latents),
                read in place by ``ops.cascade_decode`` (never copied, never written).
            suffix: a KVCache of batch n holding each request's own tokens after the prefix;
                the new K/V are written there at lens[b] and lens advances by 1.

        The token of request b sits at position T + suffix.lens[b]. Returns logits [n, V].
        """
        t = shared_k[0].shape[1]
        suffix.reserve(suffix.max_len + 1)
        new_lens = suffix.lens + 1
        length = suffix.max_len + 1
        positions = (t + suffix.lens).view(-1, 1)

        plans = self.plan_decode(new_lens, length, length, dtype=self.dtype, shared_len=t)  # no read-back

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            suffix.write(i, k, v)
            ks, vs = suffix.layer(i, length)
            o = plans.layer(i).run_cascade(q[:, :, 0], shared_k[i], shared_v[i], ks, vs)
            return cast(Tensor, o).unsqueeze(2)

        hidden = self._run(self.embed(input_ids.view(-1, 1)), positions, attend)
        suffix.advance(1)
        return self.logits(hidden[:, 0])

    def _input(self, input_ids: Tensor | None, inputs_embeds: Tensor | None, where: str) -> Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{where}: pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.cfg.hidden_size:
                raise ValueError(
                    f"{where}: inputs_embeds must end in hidden_size {self.cfg.hidden_size}, "
                    f"got {tuple(inputs_embeds.shape)}"
                )
            return inputs_embeds.to(self.dtype)
        assert input_ids is not None
        if input_ids.dim() != 2:
            raise ValueError(f"{where}: input_ids must be [B, T], got {tuple(input_ids.shape)}")
        return self.embed(input_ids)


def _check_rows(rows: Tensor, b: int, t: int) -> None:
    """``logits_at`` must be integer [B, R] with values in [0, T) (values checked on the CPU only:
    elsewhere that would be a device sync; the gather itself fails on a bad index)."""
    if rows.dim() != 2 or rows.shape[0] != b or rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"logits_at: expected int32/int64 [{b}, R], got {rows.dtype} {tuple(rows.shape)}")
    if rows.device.type == "cpu" and rows.numel():
        lo, hi = torch.stack(rows.aminmax()).tolist()  # a host tensor: one read, no device sync
        if not 0 <= lo <= hi < t:
            raise ValueError(f"logits_at: positions must lie in [0, {t}), got [{lo}, {hi}]")

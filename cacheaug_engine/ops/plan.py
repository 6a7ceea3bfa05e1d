"""Plan once, run per layer (FlashInfer's plan/run split) for the attention ops.

A plan is made once per pass (a prefill, a block pass, a decode step) and reused by every
layer. Making it does the work that does not depend on the layer:

* reads the index tensor (prefix_lens / lens / suffix_lens) back to the host ONCE to check
  its values and keep its maximum (the only host sync; none when the caller passes a bound
  it already knows, e.g. ``KVCache.max_len``, or under torch.compile);
* resolves the backend once (capability-based, backends.resolve_backend);
* for the cuda decode backend, sizes and allocates the split-KV workspace once.

``plan.run(...)`` then checks shapes only and launches. The one-call ops in ops/__init__.py
are plan-then-run. Usage::

    plan = ops.plan_segment_attention(prefix_lens, block_len=S, prefix_len=T, head_dim=64, dtype=torch.bfloat16)
    for layer in layers:
        o = plan.run(q, k, v, k_prefix, v_prefix)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cacheaug_engine.ops import reference
from cacheaug_engine.ops.backends import resolve_backend

from . import torch_impl, validate

OPS = ("segment_attention", "decode_attention", "cascade_decode", "merge_states")


def _backend_module(backend: str) -> Any:
    """The module holding ``backend``'s ops. Static imports, made on first use: Triton is optional and
    slow to import, and its kernels must be decorated after TRITON_INTERPRET is set."""
    if backend == "torch":
        return torch_impl
    if backend == "flex":
        from cacheaug_engine.ops import flex_impl

        return flex_impl
    if backend == "cuda":
        from cacheaug_engine.ops.cuda import launch

        return launch
    if backend == "triton":
        from cacheaug_engine.triton_kernels import decode, segment_attention

        return {"segment_attention": segment_attention, "decode_attention": decode, "cascade_decode": decode,
                "merge_states": decode}
    raise ValueError(f"backend: expected one of torch, flex, triton, cuda, got {backend!r}")


# Implementations resolved so far. The torch ones are bound at import so that a
# torch.compile(fullgraph=True) trace through the torch backend never meets an import.
_IMPLS: dict[tuple[str, str], Callable] = {
    (op, "torch"): getattr(torch_impl if op != "merge_states" else reference, op) for op in OPS
}


def impl(op: str, backend: str) -> Callable:
    """The implementation of ``op`` in ``backend`` (imported on first use)."""
    fn = _IMPLS.get((op, backend))
    if fn is None:
        mod = _backend_module(backend)
        mod = mod[op] if isinstance(mod, dict) else mod
        if not hasattr(mod, op):
            raise ValueError(f"op {op!r} has no {backend} implementation")
        fn = _IMPLS[(op, backend)] = getattr(mod, op)
    return fn


def _features(softcap: float | None, window: int | None, return_lse: bool, backward: bool) -> tuple[str, ...]:
    named = (("softcap", softcap is not None), ("window", window is not None), ("return_lse", return_lse),
             ("backward", backward))
    return tuple(name for name, used in named if used)


def _check_bound(name: str, value: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise ValueError(f"{name}: expected an int in [0, {high}], got {value!r}")
    return value


def _index_tensor(name: str, x: object, ndim: int) -> Tensor:
    if not isinstance(x, Tensor) or x.dtype not in validate.INT_DTYPES or x.dim() != ndim:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{name}: expected an int32/int64 torch.Tensor with {ndim} dims, got {got}")
    return x


# ------------------------------------------------------------------------------------------ segment
def _empty_segment(q: Tensor, return_lse: bool) -> Tensor | tuple[Tensor, Tensor]:
    """segment_attention's outputs for a batch of 0 requests: o [0, Hq, N*S, Dh] like q (still
    attached to q's graph, so a backward through it runs), lse fp32 [0, Hq, N*S]."""
    o = q * 0
    if not return_lse:
        return o
    return o, q.new_empty(q.shape[:3], dtype=reference.lse_dtype(q.dtype))


@dataclass(frozen=True)
class SegmentPlan:
    """A planned segment_attention: index values checked, backend chosen. Build with
    :func:`plan_segment_attention`; ``max_prefix_len`` = max(prefix_lens) (keys past it are
    never read by the torch backend)."""

    prefix_lens: Tensor
    block_len: int
    prefix_len: int
    max_prefix_len: int
    backend: str
    causal: bool = True
    softcap: float | None = None
    window: int | None = None
    scale: float | None = None
    return_lse: bool = False
    head_dim: int = 0
    dtype: torch.dtype = torch.float32
    backward: bool = False
    requested: str | None = None
    # the torch backend's masks of this pass (built by its first run, reused by every layer)
    mask_cache: dict[str, Tensor] = field(default_factory=dict, compare=False, repr=False)

    def with_window(self, window: int | None) -> SegmentPlan:
        """The same plan for a layer with another sliding window (no sync; backend re-checked)."""
        if window == self.window:
            return self
        validate.check_options(self.softcap, window, self.scale)
        feats = _features(self.softcap, window, self.return_lse, self.backward)
        name = resolve_backend("segment_attention", self.requested, self.prefix_lens.device, dtype=self.dtype,
                               head_dim=self.head_dim, features=feats)
        return dataclasses.replace(self, window=window, backend=name, mask_cache={})

    def run(
        self, q: Tensor, k: Tensor, v: Tensor, k_prefix: Tensor, v_prefix: Tensor
    ) -> Tensor | tuple[Tensor, Tensor]:
        """segment_attention of one layer; shapes as in ops.segment_attention, T = k_prefix.shape[2]
        (<= the planned prefix_len). Checks shapes only (no host sync)."""
        validate.check_segment_inputs(
            q, k, v, k_prefix, v_prefix, self.prefix_lens, self.block_len, self.softcap, self.window, self.scale,
            values=False,
        )
        if k_prefix.shape[2] < self.max_prefix_len:
            raise ValueError(
                f"k_prefix: {k_prefix.shape[2]} keys, but the plan has prefix_lens up to {self.max_prefix_len}"
            )
        if q.shape[0] == 0:  # an empty batch: empty outputs (the kernels' grids would be empty)
            return _empty_segment(q, self.return_lse)
        extra: dict[str, Any] = {}
        if self.backend == "torch":
            extra = {"max_prefix_len": self.max_prefix_len, "mask_cache": self.mask_cache}
        return impl("segment_attention", self.backend)(
            q, k, v, k_prefix, v_prefix, self.prefix_lens, block_len=self.block_len, causal=self.causal,
            softcap=self.softcap, window=self.window, scale=self.scale, return_lse=self.return_lse, **extra,
        )


def plan_segment_attention(
    prefix_lens: Tensor, *, block_len: int, prefix_len: int, head_dim: int, dtype: torch.dtype,
    causal: bool = True, softcap: float | None = None, window: int | None = None, scale: float | None = None,
    return_lse: bool = False, backward: bool | None = None, backend: str | None = None,
    max_prefix_len: int | None = None, prefix_limit: Tensor | None = None,
) -> SegmentPlan:
    """Plan segment_attention for every layer of one pass.

    Args:
        prefix_lens: int32/int64 [B, N] block starts p_k (see ops.segment_attention).
        block_len: S.  prefix_len: T, the number of prefix keys the runs will pass.
        head_dim, dtype: of q (with the options, they choose the backend).
        causal, softcap, window, scale, return_lse, backend: as in ops.segment_attention.
        backward: whether the runs need a backward (default: grad mode is on).
        max_prefix_len: a host bound the caller guarantees (max(prefix_lens) <= it <= T);
            then prefix_lens is not read back at all. Else its values are checked against
            [0, T] (and ``prefix_limit`` [B], per request) with one host read-back.

    Returns a :class:`SegmentPlan`; errors name the argument.
    """
    _index_tensor("prefix_lens", prefix_lens, 2)
    if isinstance(block_len, bool) or not isinstance(block_len, int) or block_len < 1:
        raise ValueError(f"block_len: expected an int >= 1, got {block_len!r}")
    _check_bound("prefix_len", prefix_len, 2**62)
    validate.check_flag("causal", causal)
    validate.check_flag("return_lse", return_lse)
    validate.check_options(softcap, window, scale)
    if max_prefix_len is not None:
        hi = _check_bound("max_prefix_len", max_prefix_len, prefix_len)
    else:
        seen = validate.index_range("prefix_lens", prefix_lens, 0, prefix_len, prefix_limit)
        hi = prefix_len if seen is None else seen
    if backward is None:
        backward = torch.is_grad_enabled()
    feats = _features(softcap, window, return_lse, backward)
    name = resolve_backend(
        "segment_attention", backend, prefix_lens.device, dtype=dtype, head_dim=head_dim, features=feats
    )
    return SegmentPlan(
        prefix_lens, block_len, prefix_len, hi, name, causal, softcap, window, scale, return_lse, head_dim, dtype,
        backward, backend,
    )


# ------------------------------------------------------------------------------------------- decode
@dataclass(frozen=True)
class DecodePlan:
    """A planned decode_attention / cascade_decode step (``cascade`` tells which).

    ``kv_capacity``: the most keys (Tmax, or the suffix length L for cascade) a run may
    pass; the cuda backend's split-KV workspace is sized for it once, here.
    """

    lens: Tensor
    kv_capacity: int
    backend: str
    cascade: bool = False
    softcap: float | None = None
    window: int | None = None
    scale: float | None = None
    return_lse: bool = False
    workspace: Tensor | None = None
    head_dim: int = 0
    dtype: torch.dtype = torch.float32
    requested: str | None = None

    def with_lens(self, lens: Tensor) -> DecodePlan:
        """This plan (backend, workspace) for the next step's lens, which the caller vouches for
        (e.g. KVCache lens + 1 within kv_capacity): nothing is read back."""
        _index_tensor("lens", lens, 1)
        return dataclasses.replace(self, lens=lens)

    def with_window(self, window: int | None) -> DecodePlan:
        """The same plan for a layer with another sliding window (no sync)."""
        if window == self.window:
            return self
        validate.check_options(self.softcap, window, self.scale)
        op = "cascade_decode" if self.cascade else "decode_attention"
        feats = _features(self.softcap, window, self.return_lse, False)
        name = resolve_backend(op, self.requested, self.lens.device, dtype=self.dtype, head_dim=self.head_dim,
                               features=feats)
        return dataclasses.replace(self, window=window, backend=name)

    def _extra(self) -> dict[str, Any]:
        return {"workspace": self.workspace} if self.backend == "cuda" else {}

    def run(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """decode_attention of one layer (shapes as in ops.decode_attention); shape checks only."""
        if self.cascade:
            raise ValueError("this plan is for cascade_decode: call run_cascade")
        validate.check_decode_inputs(q, k, v, self.lens, self.softcap, self.window, self.scale, values=False)
        if k.shape[2] > self.kv_capacity:
            raise ValueError(f"k: {k.shape[2]} keys exceed the plan's kv_capacity {self.kv_capacity}")
        return impl("decode_attention", self.backend)(
            q, k, v, self.lens, softcap=self.softcap, window=self.window, scale=self.scale,
            return_lse=self.return_lse, **self._extra(),
        )

    def run_cascade(
        self, q: Tensor, k_shared: Tensor, v_shared: Tensor, k_suffix: Tensor, v_suffix: Tensor
    ) -> Tensor | tuple[Tensor, Tensor]:
        """cascade_decode of one layer (shapes as in ops.cascade_decode); shape checks only."""
        if not self.cascade:
            raise ValueError("this plan is for decode_attention: call run")
        validate.check_cascade_inputs(
            q, k_shared, v_shared, k_suffix, v_suffix, self.lens, self.softcap, self.window, self.scale, values=False
        )
        if k_suffix.shape[2] > self.kv_capacity:
            raise ValueError(f"k_suffix: {k_suffix.shape[2]} keys exceed the plan's kv_capacity {self.kv_capacity}")
        return impl("cascade_decode", self.backend)(
            q, k_shared, v_shared, k_suffix, v_suffix, self.lens, softcap=self.softcap, window=self.window,
            scale=self.scale, return_lse=self.return_lse, **self._extra(),
        )


def plan_decode(
    lens: Tensor, *, kv_capacity: int, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
    softcap: float | None = None, window: int | None = None, scale: float | None = None, return_lse: bool = False,
    backend: str | None = None, max_len: int | None = None, shared_len: int | None = None,
) -> DecodePlan:
    """Plan one decode step (decode_attention; cascade_decode when ``shared_len`` is given).

    Args:
        lens: int32/int64 [B]: keys per request (cascade: suffix keys per request).
        kv_capacity: Tmax (cascade: L), the most keys a run passes; lens must lie in [0, it].
        num_q_heads, num_kv_heads, head_dim, dtype: of the runs' q and k.
        softcap, window, scale, return_lse, backend: as in ops.decode_attention.
        max_len: a host bound the caller guarantees (max(lens) <= it <= kv_capacity, e.g.
            KVCache.max_len + 1); then lens is not read back. Else one read-back checks them.
        shared_len: T of the shared cascade prefix (cascade only).
    """
    _index_tensor("suffix_lens" if shared_len is not None else "lens", lens, 1)
    name_lens = "suffix_lens" if shared_len is not None else "lens"
    _check_bound("kv_capacity", kv_capacity, 2**62)
    validate.check_flag("return_lse", return_lse)
    validate.check_options(softcap, window, scale)
    if max_len is not None:
        _check_bound("max_len", max_len, kv_capacity)
    else:
        validate.index_range(name_lens, lens, 0, kv_capacity)
        if shared_len is not None:
            validate.check_cascade_lens(lens, shared_len)
    op = "decode_attention" if shared_len is None else "cascade_decode"
    feats = _features(softcap, window, return_lse, False)
    name = resolve_backend(op, backend, lens.device, dtype=dtype, head_dim=head_dim, features=feats)
    workspace = None
    if name == "cuda":
        # imported only when the cuda backend was chosen (it needs the extension), like the impls above
        sized = _backend_module("cuda").workspace
        workspace = sized(lens.shape[0], num_q_heads, num_kv_heads, head_dim, kv_capacity, shared_len, lens.device)
    return DecodePlan(
        lens, kv_capacity, name, shared_len is not None, softcap, window, scale, return_lse, workspace, head_dim,
        dtype, backend,
    )


__all__ = ["SegmentPlan", "DecodePlan", "plan_segment_attention", "plan_decode", "impl"]

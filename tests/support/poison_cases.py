"""Poison machinery shared by tests/ops/test_poison.py and tests/kernels/test_fuzz_ops.py.

A poisoned run writes NaN / +-Inf / huge values into key positions that some query rows
cannot see (the contract of cacheaug_engine.ops.reference.finite_keys). The contract checked here: a row
that sees no poisoned key has exactly the clean run's output, lse and dq; a key that is
seen only by such rows has exactly the clean run's dk and dv.

Visibility is the dense, element-by-element mask of tests/support/dense_reference.py over the
concatenated keys [prefix (T) ; blocks (N*S)] (segment attention) or [cache (Tmax)]
(decode) or [shared (T) ; suffix (L)] (cascade).
"""

from __future__ import annotations

import torch
from dense_reference import segment_mask

POISON_VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "huge": None}


def poison_value(name: str, dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max if name == "huge" else POISON_VALUES[name]


def taint(visible: torch.Tensor, poison_keys: torch.Tensor, poison_rows: torch.Tensor | None = None):
    """visible bool [B, M, L], poison_keys bool [B, L] (and poisoned query rows [B, M]) ->
    (tainted rows [B, M], tainted keys [B, L]): what may legitimately differ from a clean run."""
    rows = (visible & poison_keys[:, None, :]).any(-1)
    if poison_rows is not None:
        rows = rows | poison_rows
    keys = poison_keys | (visible & rows[:, :, None]).any(1)
    return rows, keys


def put(x: torch.Tensor, where: torch.Tensor, value: float) -> torch.Tensor:
    """x [B, H, L, Dh] with every head's vector at the positions where[B, L] set to value."""
    x = x.clone()
    x[where[:, None, :, None].expand_as(x)] = value
    return x


def segment_visibility(prefix_lens: torch.Tensor, t: int, s: int, causal: bool, window: int | None) -> torch.Tensor:
    return segment_mask(prefix_lens.cpu(), t, s, causal, window)


def split_keys(mask: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [B, T + N*S] key mask -> (prefix part [B, T], block part [B, N*S])."""
    return mask[:, :t], mask[:, t:]


def assert_same(got: torch.Tensor, want: torch.Tensor, sel: torch.Tensor, what: str, exact: bool) -> None:
    """got/want [B, H, M(, Dh)] compared on the positions sel [B, M] (all heads, all of Dh)."""
    assert sel.any(), f"{what}: nothing to compare (the case poisons every position)"
    mask = sel[:, None, :].expand(got.shape[:3])
    g, w = got[mask].float(), want[mask].float()
    # (a clean run's own -inf, e.g. the lse of an empty decode request, stays -inf)
    leak = f"{what}: a poisoned key reached a row/key that cannot see it"
    assert torch.equal(torch.isfinite(g), torch.isfinite(w)), leak
    if exact:
        err = (g - w).abs().nan_to_num().max().item()
        assert torch.equal(g, w), f"{what}: differs from the clean run (max {err:.3g})"
    else:
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=lambda m: f"{what}: {m}")

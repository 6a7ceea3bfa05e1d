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


VALUES = ["nan", "inf", "-inf", "huge"]

# Decode / cascade poison cases: B=3, Hq=4, Hkv=2, Tmax=24 and head dim DDH (16: the interpreter's
# and torch's cases); the cuda backend takes head dims 64, 128 and 256 only, so its cases use CUDA_DH.
DB, DHQ, DHKV, TMAX, DDH = 3, 4, 2, 24, 16
CUDA_DH = 64
DLENS = [24, 7, 0]


def _decode_inputs(device, dtype=torch.float32, dh=DDH):
    g = torch.Generator().manual_seed(5)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return rnd(DB, DHQ, dh), rnd(DB, DHKV, TMAX, dh), rnd(DB, DHKV, TMAX, dh)


def _decode_visibility(lens, length, window, offset=0):
    """[B, 1, offset + length]: request b sees keys [0, offset + lens[b]) within its window."""
    pos = torch.arange(offset + length)
    n = torch.tensor(lens)[:, None] + offset
    vis = pos[None] < n
    if window is not None:
        vis &= pos[None] > n - 1 - window
    return vis[:, None, :]


def check_decode(run, device, klass, value, which, what, dh=DDH):
    """run(q, k, v, lens, window) -> (o, lse): rows that see no poisoned key match the clean run."""
    window = 5 if klass == "beyond_window" else None
    q, k, v = _decode_inputs(device, dh=dh)
    lens = torch.tensor(DLENS, dtype=torch.int32, device=device)
    vis = _decode_visibility(DLENS, TMAX, window)
    poison = ~vis[:, 0]
    if klass == "beyond_window":
        poison &= torch.arange(TMAX)[None] < torch.tensor(DLENS)[:, None]  # only the window's own class
    val = poison_value(value, q.dtype)
    pk = put(k, poison.to(device), val) if "k" in which else k
    pv = put(v, poison.to(device), val) if "v" in which else v
    clean = run(q, k, v, lens, window)
    dirty = run(q, pk, pv, lens, window)
    rows, _ = taint(vis, poison)
    assert not rows.any()
    for got, want, name in zip(dirty, clean, ("o", "lse"), strict=True):
        got, want = (x[:, :, None] if x.dim() == 3 else x[:, :, None, None] for x in (got, want))
        assert_same(got, want, ~rows, f"{what} {klass} {which}={value} {name}", True)


def check_cascade(run, device, klass, value, which, what, dh=DDH):
    """run(q, ks, vs, kx, vx, suffix_lens, window) -> (o, lse): as check_decode."""
    hkv, t, length, suffix_lens = DHKV, 10, 6, [6, 2, 0]
    window = 4 if klass == "beyond_window" else None
    g = torch.Generator().manual_seed(6)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    q, ks, vs, kx, vx = rnd(DB, DHQ, dh), rnd(hkv, t, dh), rnd(hkv, t, dh), rnd(DB, hkv, length, dh), rnd(
        DB, hkv, length, dh)
    sl = torch.tensor(suffix_lens, device=device)
    vis = _decode_visibility(suffix_lens, length, window, offset=t)
    if klass == "past_suffix_lens":
        poison = ~vis[:, 0] & (torch.arange(t + length) >= t)[None]
    else:  # shared keys request 0 cannot see (visible to the others: they are tainted) + its own suffix
        poison = (~vis[0, 0])[None].expand(DB, -1).clone()
        poison[:, t:] = ~vis[:, 0, t:] & poison[:, t:]
    val = poison_value(value, q.dtype)
    shared = poison[0, :t].to(device)[None]
    suffix = poison[:, t:].to(device)
    pks, pvs, pkx, pvx = ks, vs, kx, vx
    if "k" in which:
        pks, pkx = put(ks[None], shared, val)[0], put(kx, suffix, val)
    if "v" in which:
        pvs, pvx = put(vs[None], shared, val)[0], put(vx, suffix, val)

    clean, dirty = run(q, ks, vs, kx, vx, sl, window), run(q, pks, pvs, pkx, pvx, sl, window)
    rows, _ = taint(vis, poison)
    for got, want, name in zip(dirty, clean, ("o", "lse"), strict=True):
        got, want = (x[:, :, None] if x.dim() == 3 else x[:, :, None, None] for x in (got, want))
        assert_same(got, want, ~rows, f"{what} {klass} {which}={value} {name}", True)


DECODE_GRID = [(klass, value, which) for klass in ("past_lens", "beyond_window") for value in VALUES
               for which in ("k", "v")]
CASCADE_GRID = [(klass, value, which) for klass in ("past_suffix_lens", "beyond_window") for value in VALUES
                for which in ("k", "v")]

"""Input checks shared by every public op: run before any kernel launches.

Each error names the argument and what was expected. Value checks on index tensors
(prefix_lens, lens) read them back to the host once; they are skipped where tensors carry
no values: under torch.compile, for meta tensors and for fake tensors (FakeTensorMode).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int32, torch.int64)


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling())


def has_values(x: Tensor) -> bool:
    """False where reading x back would fail or mean nothing: compiling, meta or fake tensors."""
    if _compiling() or x.device.type == "meta":
        return False
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - older torch
        return True
    return not is_fake(x)


def check_head_dim(name: str, x: Tensor) -> int:
    dh = x.shape[-1]
    if dh < 1:
        raise ValueError(f"{name}: head dim (last dim, Dh) must be >= 1, got shape {tuple(x.shape)}")
    return dh


def check_tensor(name: str, x: object, ndim: int, layout: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor {layout}, got shape {tuple(x.shape)}")
    return x


def check_float_group(names: list[str], tensors: list[Tensor], allow_float64: bool = True) -> None:
    """All tensors share one floating dtype and one device."""
    first_name, first = names[0], tensors[0]
    allowed = FLOAT_DTYPES + ((torch.float64,) if allow_float64 else ())
    if first.dtype not in allowed:
        raise TypeError(
            f"{first_name}: expected dtype in {[str(d) for d in allowed]}, got {first.dtype}"
        )
    for name, t in zip(names[1:], tensors[1:], strict=False):
        if t.dtype != first.dtype:
            raise TypeError(f"{name}: expected dtype {first.dtype} (same as {first_name}), got {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{name}: expected device {first.device} (same as {first_name}), got {t.device}")


def check_index(
    name: str, x: object, shape: tuple[int, ...], device: torch.device, low: int, high: int, values: bool = True
) -> Tensor:
    """An integer tensor of ``shape`` on ``device`` whose values lie in [low, high] (``values=False``:
    dtype, shape and device only; ops/plan.py then reads the values once per plan)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected an int32/int64 torch.Tensor of shape {shape}, got {type(x).__name__}")
    if x.dtype not in INT_DTYPES:
        raise TypeError(f"{name}: expected dtype int32 or int64, got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name}: expected device {device} (same as q), got {x.device}")
    if values:
        index_range(name, x, low, high)
    return x


def index_range(name: str, x: Tensor, low: int, high: int, row_high: Tensor | None = None) -> int | None:
    """Check low <= x <= high (and x[b, ...] <= row_high[b] when given) with ONE host read-back;
    returns max(x) (0 when empty), or None where x carries no values (compiling, meta, fake)."""
    if not x.numel():
        return 0
    if not has_values(x):
        return None
    stats = [x.min(), x.max()]
    if row_high is not None:
        over = x.reshape(x.shape[0], -1) > row_high.to(x.device).reshape(-1, 1)
        stats.append(over.any())
    read = torch.stack([s.to(torch.long) for s in stats]).tolist()  # the one sync
    lo, hi = read[0], read[1]
    if lo < low or hi > high:
        raise ValueError(f"{name}: values must lie in [{low}, {high}], got min {lo}, max {hi}")
    if row_high is not None and read[2]:
        raise ValueError(f"{name}: values must lie in [0, lens[b]] per request = {row_high.tolist()}")
    return hi


def check_flag(name: str, value: object) -> bool:
    """``value`` is a real bool (a string such as "no" is truthy, so it is refused rather than guessed)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False (a bool), got {value!r}")
    return value


def check_options(
    softcap: float | None, window: int | None, scale: float | None
) -> None:
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap: expected None or a finite number > 0, got {softcap!r}")
    if window is not None and not (isinstance(window, int) and not isinstance(window, bool) and window >= 1):
        raise ValueError(f"window: expected None or an int >= 1, got {window!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected None or a finite number > 0, got {scale!r}")


def check_segment_inputs(
    q: Tensor, k: Tensor, v: Tensor, k_prefix: Tensor, v_prefix: Tensor, prefix_lens: Tensor,
    block_len: int, softcap: float | None, window: int | None, scale: float | None, values: bool = True,
) -> tuple[int, int, int]:
    """Validate segment_attention inputs; returns (N, S, T). ``values=False`` skips reading prefix_lens."""
    check_tensor("q", q, 4, "[B, Hq, N*S, Dh]")
    check_tensor("k", k, 4, "[B, Hkv, N*S, Dh]")
    check_tensor("v", v, 4, "[B, Hkv, N*S, Dh]")
    check_tensor("k_prefix", k_prefix, 4, "[B, Hkv, T, Dh]")
    check_tensor("v_prefix", v_prefix, 4, "[B, Hkv, T, Dh]")
    check_float_group(["q", "k", "v", "k_prefix", "v_prefix"], [q, k, v, k_prefix, v_prefix])
    check_head_dim("q", q)
    if isinstance(block_len, bool) or not isinstance(block_len, int) or block_len < 1:
        raise ValueError(f"block_len: expected an int >= 1, got {block_len!r}")
    b, hq, ns, dh = q.shape
    hkv, t = k_prefix.shape[1], k_prefix.shape[2]
    if ns % block_len or ns == 0:
        raise ValueError(f"q: dim 2 (N*S = {ns}) must be a positive multiple of block_len = {block_len}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q: Hq = {hq} must be a multiple of Hkv = {hkv} (GQA/MQA)")
    expected_kv = (b, hkv, ns, dh)
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape) != expected_kv:
            raise ValueError(f"{name}: expected shape {expected_kv} [B, Hkv, N*S, Dh], got {tuple(x.shape)}")
    expected_prefix = (b, hkv, t, dh)
    if tuple(v_prefix.shape) != expected_prefix or k_prefix.shape[0] != b or k_prefix.shape[3] != dh:
        raise ValueError(
            f"k_prefix/v_prefix: expected shape {expected_prefix} [B, Hkv, T, Dh], got "
            f"{tuple(k_prefix.shape)} and {tuple(v_prefix.shape)}"
        )
    n = ns // block_len
    check_index("prefix_lens", prefix_lens, (b, n), q.device, 0, t, values)
    check_options(softcap, window, scale)
    return n, block_len, t


def check_decode_inputs(
    q: Tensor, k: Tensor, v: Tensor, lens: Tensor, softcap: float | None, window: int | None,
    scale: float | None, values: bool = True,
) -> None:
    check_tensor("q", q, 3, "[B, Hq, Dh]")
    check_tensor("k", k, 4, "[B, Hkv, Tmax, Dh]")
    check_tensor("v", v, 4, "[B, Hkv, Tmax, Dh]")
    check_float_group(["q", "k", "v"], [q, k, v])
    check_head_dim("q", q)
    b, hq, dh = q.shape
    if k.shape[0] != b or k.shape[3] != dh or tuple(v.shape) != tuple(k.shape):
        raise ValueError(
            f"k/v: expected equal shapes [B={b}, Hkv, Tmax, Dh={dh}], got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.shape[1] == 0 or hq % k.shape[1]:
        raise ValueError(f"q: Hq = {hq} must be a multiple of Hkv = {k.shape[1]} (GQA/MQA)")
    check_index("lens", lens, (b,), q.device, 0, k.shape[2], values)
    check_options(softcap, window, scale)


def check_cascade_inputs(
    q: Tensor, k_shared: Tensor, v_shared: Tensor, k_suffix: Tensor, v_suffix: Tensor,
    suffix_lens: Tensor, softcap: float | None, window: int | None, scale: float | None, values: bool = True,
) -> None:
    check_tensor("q", q, 3, "[B, Hq, Dh]")
    check_tensor("k_shared", k_shared, 3, "[Hkv, T, Dh]")
    check_tensor("v_shared", v_shared, 3, "[Hkv, T, Dh]")
    check_tensor("k_suffix", k_suffix, 4, "[B, Hkv, L, Dh]")
    check_tensor("v_suffix", v_suffix, 4, "[B, Hkv, L, Dh]")
    check_float_group(
        ["q", "k_shared", "v_shared", "k_suffix", "v_suffix"], [q, k_shared, v_shared, k_suffix, v_suffix]
    )
    check_head_dim("q", q)
    b, hq, dh = q.shape
    hkv = k_shared.shape[0]
    if tuple(v_shared.shape) != tuple(k_shared.shape) or k_shared.shape[2] != dh:
        raise ValueError(
            f"k_shared/v_shared: expected equal shapes [Hkv, T, Dh={dh}], got "
            f"{tuple(k_shared.shape)} and {tuple(v_shared.shape)}"
        )
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q: Hq = {hq} must be a multiple of Hkv = {hkv} (GQA/MQA)")
    expected = (b, hkv, k_suffix.shape[2], dh)
    if tuple(k_suffix.shape) != expected or tuple(v_suffix.shape) != expected:
        raise ValueError(
            f"k_suffix/v_suffix: expected shape {expected} [B, Hkv, L, Dh], got "
            f"{tuple(k_suffix.shape)} and {tuple(v_suffix.shape)}"
        )
    check_index("suffix_lens", suffix_lens, (b,), q.device, 0, k_suffix.shape[2], values)
    if values:
        check_cascade_lens(suffix_lens, k_shared.shape[1])
    check_options(softcap, window, scale)


def check_cascade_lens(suffix_lens: Tensor, shared_len: int) -> None:
    """With an empty shared prefix every request needs a suffix key (one read-back, only then)."""
    if shared_len == 0 and suffix_lens.numel() and has_values(suffix_lens) and int(suffix_lens.min()) == 0:
        raise ValueError("suffix_lens: with an empty shared prefix (T = 0) every request needs suffix_lens >= 1")


def check_merge_inputs(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> None:
    for name, x in (("o_a", o_a), ("lse_a", lse_a), ("o_b", o_b), ("lse_b", lse_b)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    for name, x in (("o_a", o_a), ("o_b", o_b)):
        if x.dim() < 1:
            raise ValueError(f"{name}: expected a tensor [..., Dh] with at least 1 dim (Dh last), got a 0-D tensor")
    check_float_group(["o_a", "o_b"], [o_a, o_b])
    if o_a.shape != o_b.shape:
        raise ValueError(f"o_b: expected the shape of o_a {tuple(o_a.shape)}, got {tuple(o_b.shape)}")
    for name, x in (("lse_a", lse_a), ("lse_b", lse_b)):
        want = torch.float64 if o_a.dtype == torch.float64 else torch.float32
        if x.dtype != want:
            raise TypeError(f"{name}: expected dtype {want} (the lse of {o_a.dtype} states), got {x.dtype}")
        if tuple(x.shape) != tuple(o_a.shape[:-1]):
            raise ValueError(f"{name}: expected shape {tuple(o_a.shape[:-1])} (o_a without Dh), got {tuple(x.shape)}")
        if x.device != o_a.device:
            raise ValueError(f"{name}: expected device {o_a.device}, got {x.device}")

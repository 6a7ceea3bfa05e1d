"""Op inputs of the second hardening round (issue 26): each gets one clear error naming the
argument, or a documented acceptance (an empty batch; NaN / +inf lse in merge_states)."""

from __future__ import annotations

import math
import os
import re

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import cacheaug_engine.ops as ops_mod  # noqa: E402
import cacheaug_engine.ops.plan as plan_mod  # noqa: E402
from cacheaug_engine import ops  # noqa: E402
from cacheaug_engine.ops import reference  # noqa: E402

pytestmark = pytest.mark.reliability
NAN, INF = float("nan"), float("inf")
TDEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
BACKENDS = ["torch", "triton"]


def _dev(backend: str) -> str:
    if backend == "triton":
        pytest.importorskip("triton")
        return TDEV
    return "cpu"


def _segment_args(b: int, device: str = "cpu", n: int = 2, s: int = 5, t: int = 7) -> list:
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    lens = torch.randint(0, t + 1, (b, n), generator=g, dtype=torch.int32).to(device)
    return [r(b, 4, n * s, 16), r(b, 2, n * s, 16), r(b, 2, n * s, 16), r(b, 2, t, 16), r(b, 2, t, 16), lens]


@pytest.fixture
def no_kernel(monkeypatch):
    def launched(op, backend):
        raise AssertionError(f"{op} reached the {backend} backend: validation let bad input through")

    monkeypatch.setattr(plan_mod, "impl", launched)
    monkeypatch.setattr(ops_mod, "impl", launched)


# ----------------------------------------------------------------------------- segment_attention


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_attention_empty_batch_gives_empty_outputs(backend):
    """B = 0 is accepted: o [0, Hq, N*S, Dh] and lse [0, Hq, N*S], and a backward through them runs."""
    q, k, v, kp, vp, lens = _segment_args(0, _dev(backend))
    q.requires_grad_()
    o, lse = ops.segment_attention(q, k, v, kp, vp, lens, block_len=5, return_lse=True, backend=backend)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    o.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape
    plain = ops.segment_attention(q.detach(), k, v, kp, vp, lens, block_len=5, backend=backend)
    assert plain.shape == q.shape


@pytest.mark.parametrize("arg,value", [("causal", "no"), ("causal", 1), ("causal", None), ("return_lse", "yes")])
def test_segment_attention_flags_must_be_bool(arg, value, no_kernel):
    """causal="no" used to be truthy (a causal pass); a flag that is not a bool is refused."""
    with pytest.raises(TypeError) as info:
        ops.segment_attention(*_segment_args(1), block_len=5, **{arg: value})
    assert re.search(rf"^{arg}: expected True or False \(a bool\), got {re.escape(repr(value))}", str(info.value))


def test_decode_return_lse_must_be_bool(no_kernel):
    with pytest.raises(TypeError, match=r"^return_lse: expected True or False"):
        ops.decode_attention(torch.randn(1, 4, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16),
                             torch.tensor([5]), return_lse="yes")


# ----------------------------------------------------------------------------- merge_states


@pytest.mark.parametrize(
    "which,pattern",
    [("o_a", r"^o_a: expected a tensor \[\.\.\., Dh\] with at least 1 dim \(Dh last\), got a 0-D tensor"),
     ("o_b", r"^o_b: expected a tensor \[\.\.\., Dh\] with at least 1 dim \(Dh last\), got a 0-D tensor"),
     ("both", r"^o_a: expected a tensor \[\.\.\., Dh\]")],
)
def test_merge_states_zero_dim_names_the_dimension(which, pattern, no_kernel):
    """A 0-D o has no Dh: the error says so and names the argument (it used to blame o_b's shape)."""
    o_a, o_b = torch.randn(16), torch.randn(16)
    lse_a, lse_b = torch.tensor(0.1), torch.tensor(0.2)
    if which in ("o_a", "both"):
        o_a = torch.tensor(1.0)
    if which in ("o_b", "both"):
        o_b = torch.tensor(1.0)
    with pytest.raises(ValueError) as info:
        ops.merge_states(o_a, lse_a, o_b, lse_b)
    assert re.search(pattern, str(info.value)), str(info.value)


def test_merge_states_one_dim_states_work():
    """o [Dh] with 0-D lse (one row) is a valid state."""
    o_a, o_b = torch.randn(16), torch.randn(16)
    o, lse = ops.merge_states(o_a, torch.tensor(0.1), o_b, torch.tensor(0.2), backend="torch")
    ro, rl = reference.merge_states(o_a[None], torch.tensor([0.1]), o_b[None], torch.tensor([0.2]))
    torch.testing.assert_close(o, ro[0])
    torch.testing.assert_close(lse, rl[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_states_nan_lse_is_a_nan_row(backend, dtype):
    """A NaN in either lse gives a NaN row (o and lse), whatever the other part holds (finite,
    empty or +inf); never a plausible finite o."""
    dev = _dev(backend)
    la = torch.tensor([NAN, 0.3, NAN, -INF, NAN, 2.0], device=dev)
    lb = torch.tensor([0.1, NAN, -INF, NAN, NAN, NAN], device=dev)
    o_a, o_b = torch.randn(6, 32, device=dev).to(dtype), torch.randn(6, 32, device=dev).to(dtype)
    o, lse = ops.merge_states(o_a, la, o_b, lb, backend=backend)
    assert torch.isnan(o.float()).all(), o
    assert torch.isnan(lse).all(), lse


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_merge_states_inf_lse_contract(backend):
    """+inf lse (an overflowed state, not an empty one): o is NaN (its weight inf / inf is undefined)
    and lse is +inf (logaddexp of the two), exactly as reference.merge_states; -inf stays 'empty'."""
    dev = _dev(backend)
    la = torch.tensor([INF, 0.3, INF, INF, -INF], device=dev)
    lb = torch.tensor([0.1, INF, INF, -INF, INF], device=dev)
    o_a, o_b = torch.randn(5, 8, device=dev), torch.randn(5, 8, device=dev)
    o, lse = ops.merge_states(o_a, la, o_b, lb, backend=backend)
    ro, rl = reference.merge_states(o_a.cpu(), la.cpu(), o_b.cpu(), lb.cpu())
    assert torch.isnan(ro).all() and rl.tolist() == [math.inf] * 5  # the reference's decision
    assert torch.isnan(o).all(), o
    assert lse.cpu().tolist() == [math.inf] * 5, lse

"""`--budget-s`: one wall-clock budget -> the shapes, peers and repeats a benchmark run uses.

The issue's targets (bench/targets.py) need a few specific shapes; everything else is
context. So a budget first buys the target shapes in priority order (the one shape that
serves most targets first), then the rest of the quick grid, and the number of timed
repeats grows with what is left. Estimates of what a case costs are deliberately coarse
(GPU: compilation and autotuning dominate, not the timed calls); the run's deadlines
(BenchContext.time_budget_s) still guard the budget, so a wrong estimate costs skipped
records, never an overrun.

On the CPU every plan uses the smoke shapes: model-sized shapes do not run there in
any budget worth waiting for, and the CPU run is a rehearsal of the GPU one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import e2e
from . import shapes as S

# Rough seconds per case on one H100/H200-class GPU, compilation included (leads, not readings).
SEGMENT_SHAPE_COST_S = 40.0  # one shape, fwd and fwd+bwd, ours + FlexAttention compiles + SDPA
DECODE_SHAPE_COST_S = 3.0
CASCADE_SHAPE_COST_S = 4.0
TRAIN_CASE_COST_S = 45.0  # one model, default + flex (compile) + naive loop
MIN_BUDGET_S = 10.0
SECTION_PARTS = ("segment", "decode_attention", "cascade", "merge", "train", "decode_e2e")


@dataclass(frozen=True)
class BenchPlan:
    """What a run of the given budget measures (see module doc)."""

    budget_s: float
    level: str  # "smoke" (CPU), "targets" (target shapes only), "targets+quick" (and the quick grid's)
    repeats: int
    warmup: int
    segment: list[S.SegmentShape]
    segment_peers: tuple[str, ...]
    decode: list[S.DecodeShape]
    cascade: list[S.DecodeShape]
    merge: list[tuple[int, int, int]]
    train: list[dict[str, Any]]
    train_names: tuple[str, ...]
    decode_e2e: list[dict[str, Any]]
    shares: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly description (stored in the result file's config)."""
        return {
            "budget_s": self.budget_s, "level": self.level, "repeats": self.repeats, "warmup": self.warmup,
            "segment_shapes": len(self.segment), "segment_peers": list(self.segment_peers),
            "decode_shapes": len(self.decode), "cascade_shapes": len(self.cascade), "merge_shapes": len(self.merge),
            "train_cases": len(self.train), "train_names": list(self.train_names),
            "decode_e2e_cases": len(self.decode_e2e), "shares": self.shares,
        }


def check_budget(budget_s: float) -> float:
    """The budget as a float, or ValueError naming --budget-s."""
    try:
        value = float(budget_s)
    except (TypeError, ValueError):
        raise ValueError(f"--budget-s must be a number of seconds, got {budget_s!r}") from None
    if not value >= MIN_BUDGET_S:  # also rejects NaN
        raise ValueError(f"--budget-s must be at least {MIN_BUDGET_S:g} seconds, got {budget_s!r}")
    return value


def _repeats(budget_s: float) -> tuple[int, int]:
    if budget_s >= 400:
        return 20, 3
    if budget_s >= 200:
        return 10, 2
    return 5, 2


def _take(items: list[Any], seconds: float, cost: float, at_least: int = 1) -> list[Any]:
    n = max(at_least, int(seconds // cost))
    return items[: min(len(items), n)]


def plan_for_budget(budget_s: float, device_type: str, sections: tuple[str, ...] = ("ops", "train", "decode"),
                    shares: dict[str, float] | None = None) -> BenchPlan:
    """The plan for ``budget_s`` seconds of ``sections`` on ``device_type`` ("cuda" or "cpu")."""
    budget_s = check_budget(budget_s)
    shares = dict(shares or {})
    if device_type != "cuda":
        # Every op and peer once, at the smallest smoke shapes (Triton runs interpreted here):
        # Gemma-2's segment shape (softcap + window paths), SmolLM2's decode shape.
        return BenchPlan(
            budget_s, "smoke", repeats=2 if budget_s >= 120 else 1, warmup=1,
            segment=S.segment_shapes("quick", smoke=True)[-1:],
            segment_peers=("flex_compiled", "sdpa_dense", "naive_loop"),
            decode=S.decode_shapes(smoke=True)[:1], cascade=S.cascade_shapes(smoke=True),
            merge=S.merge_shapes(smoke=True), train=e2e.train_cases(smoke=True),
            train_names=("default", "flex", "peer:naive_loop"), decode_e2e=e2e.decode_cases(smoke=True),
            shares=shares,
        )
    total = sum(shares.values()) or 1.0

    def part(name: str) -> float:
        return budget_s * shares.get(name, 0.0) / total

    seg_targets = S.target_segment_shapes()
    seg = _take(seg_targets, part("segment"), SEGMENT_SHAPE_COST_S)
    level = "targets"
    if len(seg) == len(seg_targets) and part("segment") >= SEGMENT_SHAPE_COST_S * (len(seg) + 3):
        extra = [s for s in S.segment_shapes("quick") if s not in seg]
        seg += _take(extra, part("segment") - SEGMENT_SHAPE_COST_S * len(seg), SEGMENT_SHAPE_COST_S, 0)
        level = "targets+quick"
    peers: tuple[str, ...] = ("flex_compiled", "sdpa_dense")
    if budget_s >= 300:
        peers += ("naive_loop", "flash_attn", "flashinfer")
    dec_t = S.target_decode_shapes()
    dec = dec_t + [d for d in S.decode_shapes() if d not in dec_t]
    cas_t = S.target_cascade_shapes()
    cas = cas_t + [c for c in S.cascade_shapes() if c not in cas_t]
    train_all = e2e.train_cases(smoke=False)
    names: tuple[str, ...] = ("default", "flex", "peer:naive_loop")
    if budget_s >= 400:
        names = ("default", "triton", "flex", "torch", "peer:naive_loop")
    repeats, warmup = _repeats(budget_s)
    return BenchPlan(
        budget_s, level, repeats, warmup, segment=seg, segment_peers=peers,
        decode=_take(dec, part("decode_attention"), DECODE_SHAPE_COST_S, len(dec_t)),
        cascade=_take(cas, part("cascade"), CASCADE_SHAPE_COST_S, len(cas_t)),
        merge=S.merge_shapes() if part("merge") >= 5 else S.merge_shapes()[:1],
        train=_take(train_all, part("train"), TRAIN_CASE_COST_S),
        train_names=names,
        decode_e2e=_take(e2e.decode_cases(smoke=False), part("decode_e2e"), 20.0),
        shares=shares,
    )

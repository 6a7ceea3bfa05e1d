"""Benchmark shapes taken from real models (issue 7).

Segment attention: T in {1k, 4k, 16k}, N in {16, 64, 128}, N_L in {4, 16, 64}, N_A = 16,
block length S = N_L + N_A - 1. The full cross product (81 shapes per model-free axis)
does not fit one 10-minute device call with every peer, so the default ``grid="sweep"``
varies one axis at a time around a base point (T = 4k, N = 64, N_L = 16) for every model;
``grid="full"`` is the whole product. Decode: T up to 128k.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class AttnModel:
    name: str
    hq: int
    hkv: int
    dh: int
    softcap: float | None = None
    window: int | None = None


MODELS: dict[str, AttnModel] = {
    "smollm2-135m": AttnModel("smollm2-135m", 9, 3, 64),
    "gemma2-2b": AttnModel("gemma2-2b", 8, 4, 256, softcap=50.0, window=4096),
    "llama3-8b": AttnModel("llama3-8b", 32, 8, 128),
}
# CPU smoke: same head layouts, tiny head dims and sequence lengths.
SMOKE_MODELS: dict[str, AttnModel] = {
    "smollm2-135m": AttnModel("smollm2-135m", 9, 3, 64),
    "gemma2-2b": AttnModel("gemma2-2b", 8, 4, 64, softcap=50.0, window=48),
}

T_VALUES = (1024, 4096, 16384)
N_VALUES = (16, 64, 128)
NL_VALUES = (4, 16, 64)
N_A = 16
BASE = {"T": 4096, "N": 64, "N_L": 16}


@dataclass(frozen=True)
class SegmentShape:
    model: str
    hq: int
    hkv: int
    dh: int
    t: int
    n: int
    n_l: int
    n_a: int
    softcap: float | None
    window: int | None
    b: int = 1
    causal: bool = True

    @property
    def s(self) -> int:
        return self.n_l + self.n_a - 1

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["s"] = self.s
        return d

    def prefix_lens(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """N evenly spaced augmentation points p_1 < ... < p_N in [1, T - N_A], int32 [B, N]."""
        hi = max(1, self.t - self.n_a)
        pts = torch.linspace(1, hi, self.n, dtype=torch.float64).round().to(torch.int32)
        return pts.view(1, -1).expand(self.b, -1).contiguous().to(device)


def _seg(model: AttnModel, t: int, n: int, n_l: int, b: int = 1) -> SegmentShape:
    m = model
    return SegmentShape(m.name, m.hq, m.hkv, m.dh, t, n, n_l, N_A, m.softcap, m.window, b)


def segment_shapes(grid: str = "sweep", smoke: bool = False) -> list[SegmentShape]:
    if smoke:
        return [
            _seg(SMOKE_MODELS["smollm2-135m"], 96, 4, 4),
            _seg(SMOKE_MODELS["gemma2-2b"], 128, 3, 4),
        ]
    out: list[SegmentShape] = []
    for model in MODELS.values():
        if grid == "full":
            out += [_seg(model, t, n, nl) for t in T_VALUES for n in N_VALUES for nl in NL_VALUES]
            continue
        if grid not in ("sweep", "quick"):
            raise ValueError(f"grid must be sweep, quick or full, got {grid!r}")
        out += [_seg(model, t, BASE["N"], BASE["N_L"]) for t in T_VALUES]
        if grid == "sweep":
            out += [_seg(model, BASE["T"], n, BASE["N_L"]) for n in N_VALUES if n != BASE["N"]]
            out += [_seg(model, BASE["T"], BASE["N"], nl) for nl in NL_VALUES if nl != BASE["N_L"]]
    return out


@dataclass(frozen=True)
class DecodeShape:
    model: str
    hq: int
    hkv: int
    dh: int
    b: int
    t: int
    softcap: float | None
    window: int | None
    suffix: int = 0  # cascade: per-request suffix capacity (latents + generated tokens)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


DECODE_T = (4096, 32768, 131072)
DECODE_B = (1, 16)
CASCADE_B = (8, 32)
CASCADE_SUFFIX = 64 + 256  # N_L = 64 latents + 256 generated tokens


def decode_shapes(smoke: bool = False) -> list[DecodeShape]:
    if smoke:
        m = SMOKE_MODELS["smollm2-135m"]
        g = SMOKE_MODELS["gemma2-2b"]
        return [DecodeShape(m.name, m.hq, m.hkv, m.dh, 2, 256, None, None),
                DecodeShape(g.name, g.hq, g.hkv, g.dh, 2, 200, g.softcap, g.window)]
    out = []
    for m in MODELS.values():
        for t in DECODE_T:
            for b in DECODE_B:
                out.append(DecodeShape(m.name, m.hq, m.hkv, m.dh, b, t, m.softcap, m.window))
    return out


def cascade_shapes(smoke: bool = False) -> list[DecodeShape]:
    if smoke:
        m = SMOKE_MODELS["smollm2-135m"]
        return [DecodeShape(m.name, m.hq, m.hkv, m.dh, 4, 256, None, None, suffix=24)]
    out = []
    for name in ("smollm2-135m", "llama3-8b", "gemma2-2b"):
        m = MODELS[name]
        for t in DECODE_T:
            for b in CASCADE_B:
                out.append(DecodeShape(m.name, m.hq, m.hkv, m.dh, b, t, m.softcap, m.window, CASCADE_SUFFIX))
    return out


def merge_shapes(smoke: bool = False) -> list[tuple[int, int, int]]:
    """(rows = B * Hq, Dh, splits) for merge_states."""
    if smoke:
        return [(4 * 9, 64, 1)]
    return [(16 * 32, 128, 1), (256 * 32, 128, 1), (4096 * 32, 128, 1), (256 * 8, 256, 1)]


# --- the targets (bench/targets.py): the shapes each target is judged on ----------------

TARGET_SEGMENT_T = (2048, 8192)
TARGET_SEGMENT_NL = (16, 64)  # S = N_L + N_A - 1 = 31 and 79
TARGET_SEGMENT_N = 64
TARGET_DECODE_MIN_T = 32768
TARGET_CASCADE = (16384, 32)  # T, B


def target_segment_shapes() -> list[SegmentShape]:
    """Gemma-2-2B, Llama-3-8B and SmolLM2 heads x T {2k, 8k} x S {31, 79}, N = 64, in priority order.

    First Llama-3-8B at T = 8k, S = 31 (it serves the fwd+bwd ratios and the fwd % of matmul
    peak), then one shape per model, then the rest: a short budget still judges every target.
    """
    order = [("llama3-8b", 8192, 16), ("smollm2-135m", 2048, 16), ("gemma2-2b", 8192, 64),
             ("llama3-8b", 8192, 64)]
    out = [_seg(MODELS[m], t, TARGET_SEGMENT_N, nl) for m, t, nl in order]
    for name in ("llama3-8b", "gemma2-2b", "smollm2-135m"):
        for t in TARGET_SEGMENT_T:
            for nl in TARGET_SEGMENT_NL:
                shape = _seg(MODELS[name], t, TARGET_SEGMENT_N, nl)
                if shape not in out:
                    out.append(shape)
    return out


def target_decode_shapes() -> list[DecodeShape]:
    """decode_attention at T >= 32k (Llama-3-8B first: the target's memory-bound case)."""
    out = []
    for name in ("llama3-8b", "smollm2-135m", "gemma2-2b"):
        m = MODELS[name]
        for t in (t for t in DECODE_T if t >= TARGET_DECODE_MIN_T):
            out.append(DecodeShape(m.name, m.hq, m.hkv, m.dh, 16, t, m.softcap, m.window))
    return out


def target_cascade_shapes() -> list[DecodeShape]:
    """32 requests over one 16k prompt, per model."""
    t, b = TARGET_CASCADE
    return [DecodeShape(MODELS[n].name, MODELS[n].hq, MODELS[n].hkv, MODELS[n].dh, b, t, MODELS[n].softcap,
                        MODELS[n].window, CASCADE_SUFFIX) for n in ("llama3-8b", "smollm2-135m", "gemma2-2b")]

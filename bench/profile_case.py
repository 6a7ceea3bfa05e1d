"""Run one target's kernel a few times at one shape, for a profiler to attach to (bench/gpu_check.py's ncu step).

    python -m cacheaug_engine.bench.profile_case \
        '{"target": "decode_pct_copy_bw", "shape": {"model": "llama3-8b", "t": 32768, "b": 16}}'

The shape is the compact one bench/targets.py reports; missing fields take the target
grid's values. Six calls (the profiler skips the first, which compile and autotune).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from .shapes import CASCADE_SUFFIX, MODELS, N_A, TARGET_CASCADE, SegmentShape

CALLS = 6


def _rnd(*size: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(*size, device=device, dtype=dtype)


def _segment(shape: dict[str, Any], backward: bool, device: torch.device) -> None:
    from cacheaug_engine import segment_attention

    m = MODELS[shape.get("model", "llama3-8b")]
    s = int(shape.get("s", 31))
    sh = SegmentShape(m.name, m.hq, m.hkv, m.dh, int(shape.get("t", 8192)), int(shape.get("n", 64)), s - N_A + 1,
                      N_A, m.softcap, m.window)
    ns = sh.n * sh.s
    q = _rnd(1, sh.hq, ns, sh.dh, device=device).requires_grad_(backward)
    k = _rnd(1, sh.hkv, ns, sh.dh, device=device).requires_grad_(backward)
    v = _rnd(1, sh.hkv, ns, sh.dh, device=device).requires_grad_(backward)
    kp, vp = _rnd(1, sh.hkv, sh.t, sh.dh, device=device), _rnd(1, sh.hkv, sh.t, sh.dh, device=device)
    lens = sh.prefix_lens(device)
    for _ in range(CALLS):
        out = segment_attention(q, k, v, kp, vp, lens, block_len=sh.s, softcap=sh.softcap, window=sh.window,
                                backend="triton")
        if backward:
            out.backward(torch.ones_like(out))


def _decode(shape: dict[str, Any], device: torch.device) -> None:
    from cacheaug_engine import decode_attention

    m = MODELS[shape.get("model", "llama3-8b")]
    b, t = int(shape.get("b", 16)), int(shape.get("t", 32768))
    q = _rnd(b, m.hq, m.dh, device=device)
    k, v = _rnd(b, m.hkv, t, m.dh, device=device), _rnd(b, m.hkv, t, m.dh, device=device)
    lens = torch.full((b,), t, dtype=torch.int32, device=device)
    for _ in range(CALLS):
        decode_attention(q, k, v, lens, softcap=m.softcap, window=m.window)


def _cascade(shape: dict[str, Any], device: torch.device) -> None:
    from cacheaug_engine import cascade_decode

    m = MODELS[shape.get("model", "llama3-8b")]
    t, b = int(shape.get("t", TARGET_CASCADE[0])), int(shape.get("b", TARGET_CASCADE[1]))
    q = _rnd(b, m.hq, m.dh, device=device)
    ks, vs = _rnd(m.hkv, t, m.dh, device=device), _rnd(m.hkv, t, m.dh, device=device)
    kx, vx = _rnd(b, m.hkv, CASCADE_SUFFIX, m.dh, device=device), _rnd(b, m.hkv, CASCADE_SUFFIX, m.dh, device=device)
    lens = torch.full((b,), CASCADE_SUFFIX, dtype=torch.int32, device=device)
    for _ in range(CALLS):
        cascade_decode(q, ks, vs, kx, vx, lens, softcap=m.softcap, window=m.window)


def run_case(case: dict[str, Any], device: torch.device) -> None:
    """Run ``case["target"]``'s op CALLS times at ``case["shape"]`` on ``device``."""
    target, shape = case.get("target"), case.get("shape") or {}
    if target in ("segment_fwdbwd_vs_flex", "segment_fwdbwd_vs_sdpa_dense"):
        _segment(shape, True, device)
    elif target == "segment_fwd_pct_matmul_peak":
        with torch.no_grad():
            _segment(shape, False, device)
    elif target == "decode_pct_copy_bw":
        _decode(shape, device)
    elif target == "cascade_vs_per_request_decode":
        _cascade(shape, device)
    else:
        raise ValueError(f"profile_case: no kernel case for target {target!r}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m cacheaug_engine.bench.profile_case '<json case>'", file=sys.stderr)
        return 2
    try:
        case = json.loads(args[0])
    except json.JSONDecodeError as exc:
        print(f"profile_case: the case is not JSON: {exc}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run_case(case, device)
    print(f"profile_case: ran {case.get('target')} {CALLS} times on {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

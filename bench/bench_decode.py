"""Decode and cascade-decode benchmark (self-contained; writes one JSON file).

    python bench/bench_decode.py                 # GPU: full grid -> bench/results/decode_<gpu>.json
    python bench/bench_decode.py --smoke         # CPU or GPU, tiny shapes, seconds

Decode: Llama-3-8B heads (32 q / 8 kv, Dh 128, bf16), T in {4k, 32k, 128k}, B in {1, 8, 64},
full caches. Each backend (cuda, triton) vs SDPA (enable_gqa, no expanded copies), and vs
flash-attn's flash_attn_with_kvcache / FlashInfer when importable (else recorded as
"unavailable: reason"). Bandwidth: bytes of K+V (+q, o) per call / time, and as % of the
device-copy bandwidth measured in the same run (read + write of a 1 GiB buffer).

Cascade: B = 32 requests sharing a 16k prompt (+64 own suffix keys each): ours vs
concatenating [shared ; suffix] per request and running SDPA per request (the naive way).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _timer(device: torch.device, fn, warmup: int, iters: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(device: torch.device, nbytes: int, warmup: int, iters: int) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    t = _timer(device, lambda: dst.copy_(src), warmup, iters)
    return 2 * nbytes / t  # read + write


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "flash_attn", "flashinfer", "cupy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            out[mod] = f"unavailable: {type(exc).__name__}: {exc}"[:200]
    try:
        out["commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        out["commit"] = "unknown"
    return out


def _backends(device: torch.device, wanted: list[str]) -> dict[str, str | None]:
    from cacheaug_engine.ops.backends import backend_reason

    return {name: backend_reason(name, device) for name in wanted}


def _flash_attn_fn():
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception as exc:  # noqa: BLE001
        return None, f"unavailable: {type(exc).__name__}: {exc}"[:200]
    return flash_attn_with_kvcache, None


def _flashinfer_reason():
    try:
        import flashinfer  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"unavailable: {type(exc).__name__}: {exc}"[:200]
    return "unavailable: flashinfer imports but its paged-KV wrapper is not wired into this script"


def _recorder(row: dict, gbs_key: str, nbytes: int, device: torch.device, bw: float, warmup: int, iters: int):
    """record(name, fn): fn's median time, bandwidth (nbytes per call) and % of copy bandwidth into row[name]."""

    def record(name, fn):
        try:
            sec = _timer(device, fn, warmup, iters)
        except Exception as exc:  # noqa: BLE001
            row[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            return
        gbs = nbytes / sec / 1e9
        row[name] = {"ms": sec * 1e3, gbs_key: gbs, "pct_copy_bw": 100 * gbs * 1e9 / bw if bw else None}

    return record


def _decode_one(device, dtype, t, b, backends, bw, warmup, iters, fa_fn, fa_reason, fi_reason) -> dict:
    from cacheaug_engine import ops

    hq, hkv, dh = 32, 8, 128
    torch.manual_seed(0)
    q = torch.randn(b, hq, dh, device=device, dtype=dtype)
    k = torch.randn(b, hkv, t, dh, device=device, dtype=dtype)
    v = torch.randn(b, hkv, t, dh, device=device, dtype=dtype)
    lens = torch.full((b,), t, device=device, dtype=torch.int32)
    nbytes = (k.numel() + v.numel() + 2 * q.numel()) * k.element_size()
    row = {
        "op": "decode",
        "B": b,
        "T": t,
        "Hq": hq,
        "Hkv": hkv,
        "Dh": dh,
        "dtype": str(dtype),
        "bytes": nbytes,
    }

    record = _recorder(row, "GB/s", nbytes, device, bw, warmup, iters)

    q4 = q.unsqueeze(2)
    record("sdpa", lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True))
    for name, reason in backends.items():
        if reason is None:
            record(name, lambda name=name: ops.decode_attention(q, k, v, lens, backend=name))
        else:
            row[name] = {"skipped": reason}
    if fa_fn is not None:
        kf, vf = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        qf = q.unsqueeze(1)
        record("flash_attn", lambda: fa_fn(qf, kf, vf, cache_seqlens=lens))
    else:
        row["flash_attn"] = {"skipped": fa_reason}
    row["flashinfer"] = {"skipped": fi_reason}
    if "ms" in row.get("sdpa", {}):
        for name in list(backends) + ["flash_attn"]:
            if "ms" in row.get(name, {}):
                row[name]["speedup_vs_sdpa"] = row["sdpa"]["ms"] / row[name]["ms"]
    return row


def bench_decode(device, dtype, shapes, backends, bw, warmup, iters) -> list[dict]:
    fa_fn, fa_reason = _flash_attn_fn() if device.type == "cuda" else (None, "unavailable: needs CUDA")
    fi_reason = _flashinfer_reason()
    rows = []
    for t, b in shapes:
        row = _decode_one(device, dtype, t, b, backends, bw, warmup, iters, fa_fn, fa_reason, fi_reason)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_cascade(device, dtype, b, t, length, backends, bw, warmup, iters) -> dict:
    from cacheaug_engine import ops

    hq, hkv, dh = 32, 8, 128
    torch.manual_seed(1)
    q = torch.randn(b, hq, dh, device=device, dtype=dtype)
    ks = torch.randn(hkv, t, dh, device=device, dtype=dtype)
    vs = torch.randn(hkv, t, dh, device=device, dtype=dtype)
    kx = torch.randn(b, hkv, length, dh, device=device, dtype=dtype)
    vx = torch.randn(b, hkv, length, dh, device=device, dtype=dtype)
    sl = torch.full((b,), length, device=device, dtype=torch.int32)
    nbytes = (ks.numel() + vs.numel() + kx.numel() + vx.numel() + 2 * q.numel()) * q.element_size()
    row = {
        "op": "cascade",
        "B": b,
        "T_shared": t,
        "L_suffix": length,
        "Hq": hq,
        "Hkv": hkv,
        "Dh": dh,
        "dtype": str(dtype),
        "unique_bytes": nbytes,
    }

    def baseline():
        outs = []
        for i in range(b):
            kc = torch.cat([ks, kx[i]], dim=1).unsqueeze(0)
            vc = torch.cat([vs, vx[i]], dim=1).unsqueeze(0)
            outs.append(F.scaled_dot_product_attention(q[i : i + 1].unsqueeze(2), kc, vc, enable_gqa=True))
        return torch.cat(outs)

    record = _recorder(row, "unique_GB/s", nbytes, device, bw, warmup, iters)

    record("concat_sdpa_per_request", baseline)
    for name, reason in backends.items():
        if reason is None:
            record(name, lambda name=name: ops.cascade_decode(q, ks, vs, kx, vx, sl, backend=name))
        else:
            row[name] = {"skipped": reason}
    base = row["concat_sdpa_per_request"].get("ms")
    for name in backends:
        if base and "ms" in row.get(name, {}):
            row[name]["speedup_vs_concat_sdpa"] = base / row[name]["ms"]
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, runs on the CPU in seconds")
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/decode_<device>.json)"
    )
    ap.add_argument("--backends", default="cuda,triton", help="comma-separated cacheaug backends to time")
    ap.add_argument("--iters", type=int, default=None)
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and not args.smoke:
        print("no CUDA device: run with --smoke on a CPU", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if cuda else torch.float32
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.smoke:
        shapes = [(256, 1), (512, 2)]
        casc = (2, 256, 8)
        warmup, iters = 1, args.iters or 3
        copy_bytes = 1 << 24
        if not cuda:
            wanted = ["torch"] + [w for w in wanted if w != "torch"]
    else:
        shapes = [(t, b) for t in (4096, 32768, 131072) for b in (1, 8, 64)]
        casc = (32, 16384, 64)
        warmup, iters = 5, args.iters or 30
        copy_bytes = 1 << 30
    backends = _backends(device, wanted)
    bw = copy_bandwidth(device, copy_bytes, warmup, iters)
    dev_name = torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})"
    print(f"device: {dev_name}; device copy bandwidth {bw / 1e9:.1f} GB/s; backends {backends}", flush=True)
    result = {
        "benchmark": "decode",
        "smoke": args.smoke,
        "device": dev_name,
        "versions": _versions(),
        "copy_bandwidth_GBps": bw / 1e9,
        "backends": {k: (v or "ok") for k, v in backends.items()},
        "decode": bench_decode(device, dtype, shapes, backends, bw, warmup, iters),
        "cascade": bench_cascade(device, dtype, *casc, backends, bw, warmup, max(3, iters // 3)),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = args.out
    if out is None:
        tag = "smoke" if args.smoke else dev_name.replace(" ", "_").replace("/", "_")
        out = ROOT / "bench" / "results" / f"decode_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

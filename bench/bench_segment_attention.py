"""Segment attention benchmark: fused Triton vs FlexAttention vs SDPA with a dense mask.

Self-contained (does not use the bench/ harness). On a GPU it times, for the issue-5
shapes (Gemma-2-2B 8/4 heads Dh 256 softcap 50, Llama-3-8B 32/8 Dh 128, SmolLM2 9/3 Dh
64; T in {2048, 8192}; N = 64 blocks of S in {31, 79}; bf16):

  * triton: cacheaug_engine.triton_kernels.segment_attention (the fused kernels);
  * flex: torch.compile'd flex_attention over [k_prefix ; k] with the equivalent
    BlockMask from cacheaug_engine.ops.flex_impl.build_block_mask (built once, outside
    the timing; the per-call key concatenation is timed, as the flex backend does it);
  * sdpa: F.scaled_dot_product_attention on pre-concatenated keys with a dense boolean
    mask [B, 1, N*S, T + N*S] (built once; SDPA has no softcap, so Gemma-2 rows time it
    without - recorded as "softcap_ignored").

Modes: "fwd" and "fwdbwd" (forward + backward of <o, dO> into q, k, v). Reported per
case: median ms, useful TFLOP/s (visible scores only: 4*Dh per visible score forward,
10*Dh more backward) and speedups of triton over each peer, all from the same run.

    python bench/bench_segment_attention.py                 # GPU: full table -> JSON
    python bench/bench_segment_attention.py --smoke         # CPU or GPU: one tiny case, seconds

On the CPU, --smoke runs the Triton kernels under TRITON_INTERPRET=1 (set here before
triton is imported) against the torch backend and SDPA; its numbers only prove the
script works. Writes JSON (device, versions, commit, records) to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

MODELS = {  # name: (Hq, Hkv, Dh, softcap)
    "gemma2-2b": (8, 4, 256, 50.0),
    "llama3-8b": (32, 8, 128, None),
    "smollm2": (9, 3, 64, None),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def prefix_lens(b: int, n: int, t: int, device) -> torch.Tensor:
    """Evenly spread augmentation points p_k in [1, T] (sorted, as the training layout makes them)."""
    p = [max(1, min(t, round((k + 1) * t / (n + 1)))) for k in range(n)] if t else [0] * n
    return torch.tensor([p] * b, dtype=torch.int32, device=device)


def visible_scores(lens: torch.Tensor, s: int, causal: bool, window: int | None) -> int:
    """Number of (query, key) pairs that are visible, per query head, summed over batch and blocks."""
    from cacheaug_engine.ops.reference import segment_visibility

    total = 0
    for p in lens.flatten().tolist():
        total += int(segment_visibility(int(p), s, causal=causal, window=window).sum())
    return total


def make_inputs(b, hq, hkv, n, s, t, dh, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.5).to(device=device, dtype=dtype)

    return (rnd(b, hq, n * s, dh), rnd(b, hkv, n * s, dh), rnd(b, hkv, n * s, dh),
            rnd(b, hkv, t, dh), rnd(b, hkv, t, dh), prefix_lens(b, n, t, device))


def dense_mask(lens: torch.Tensor, t: int, ns: int, s: int, causal: bool, window: int | None) -> torch.Tensor:
    """[B, 1, N*S, T + N*S] boolean mask of the segment pattern over concatenated keys."""
    dev = lens.device
    qi = torch.arange(ns, device=dev)
    blk, row = qi // s, qi % s
    p = lens.long()[:, blk]  # [B, NS]
    kv = torch.arange(t + ns, device=dev)
    in_prefix = kv < t
    local = kv - t
    same = (local.view(1, -1) // s) == blk.view(-1, 1)
    local_ok = same & ((local.view(1, -1) % s) <= row.view(-1, 1)) if causal else same
    vis = torch.where(in_prefix.view(1, 1, -1), kv.view(1, 1, -1) < p.unsqueeze(-1), local_ok.unsqueeze(0))
    if window is not None:
        key_pos = torch.where(in_prefix.view(1, 1, -1), kv.view(1, 1, -1), p.unsqueeze(-1) + (local % s).view(1, 1, -1))
        vis = vis & (key_pos > (p + row.view(1, -1)).unsqueeze(-1) - window)
    return vis.unsqueeze(1)


def make_runners(inputs, s: int, causal: bool, softcap, window, device_type: str, peers: list[str]):
    """name -> callable(q, k, v) returning o, for the requested peers (skipped ones get a reason)."""
    import torch.nn.functional as F
    from cacheaug_engine.triton_kernels.segment_attention import segment_attention as triton_sa

    from cacheaug_engine.ops import flex_impl, torch_impl

    q, k, v, kp, vp, lens = inputs
    t, ns, dh = kp.shape[2], q.shape[2], q.shape[3]
    opts = dict(block_len=s, causal=causal, softcap=softcap, window=window)
    runners, skipped = {}, {}
    runners["triton"] = lambda q, k, v: triton_sa(q, k, v, kp, vp, lens, **opts)
    if "flex" in peers:
        if device_type != "cuda":
            skipped["flex"] = "FlexAttention is compiled on CUDA only in this benchmark (CPU: eager, fwd only)"
        else:
            bm = flex_impl.build_block_mask(lens, t, ns, s, causal, window)
            runners["flex"] = lambda q, k, v: flex_impl.segment_attention(q, k, v, kp, vp, lens, block_mask=bm, **opts)
    if "sdpa" in peers:
        mask = dense_mask(lens, t, ns, s, causal, window)
        k_cat, v_cat = torch.cat([kp, k.detach()], 2), torch.cat([vp, v.detach()], 2)
        gqa = q.shape[1] != k.shape[1]

        def sdpa(q, k, v):
            kc = torch.cat([kp, k], 2) if k.requires_grad else k_cat
            vc = torch.cat([vp, v], 2) if v.requires_grad else v_cat
            return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=1 / math.sqrt(dh), enable_gqa=gqa)

        runners["sdpa"] = sdpa
    if "torch" in peers:
        runners["torch"] = lambda q, k, v: torch_impl.segment_attention(q, k, v, kp, vp, lens, **opts)
    return runners, skipped


def time_ms(fn, warmup: int, rep: int, device_type: str) -> float:
    for _ in range(warmup):
        fn()
    times = []
    if device_type == "cuda":
        for _ in range(rep):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_case(model, t, n, s, dtype, args, device) -> list[dict]:
    hq, hkv, dh, softcap = MODELS[model]
    inputs = make_inputs(args.batch, hq, hkv, n, s, t, dh, dtype, device)
    q, k, v = inputs[:3]
    vis = visible_scores(inputs[5], s, True, None) * hq
    flops = {"fwd": 4.0 * dh * vis, "fwdbwd": 14.0 * dh * vis}
    runners, skipped = make_runners(inputs, s, True, softcap, None, device.type, args.peers)
    shape = dict(model=model, B=args.batch, Hq=hq, Hkv=hkv, Dh=dh, T=t, N=n, S=s, softcap=softcap)
    go = torch.randn_like(q)
    records = []
    for mode in args.modes:
        ms = {}
        for name, fn in runners.items():
            rec = dict(op="segment_attention", mode=mode, backend=name, shape=shape, dtype=str(dtype).split(".")[-1])
            if name == "sdpa" and softcap is not None:
                rec["softcap_ignored"] = True
            try:
                if mode == "fwd":
                    def call(fn=fn, q=q, k=k, v=v):
                        with torch.no_grad():
                            fn(q, k, v)
                else:
                    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

                    def call(fn=fn, qg=qg, kg=kg, vg=vg):
                        torch.autograd.grad((fn(qg, kg, vg) * go).sum(), (qg, kg, vg))
                rec["ms"] = time_ms(call, args.warmup, args.rep, device.type)
                rec["tflops"] = flops[mode] / (rec["ms"] * 1e-3) / 1e12
                rec["status"] = "ok"
                ms[name] = rec["ms"]
            except torch.cuda.OutOfMemoryError as exc:
                rec["status"] = f"oom: {str(exc).splitlines()[0]}"
                torch.cuda.empty_cache()
            except Exception as exc:  # noqa: BLE001 - a failing peer is recorded, the run goes on
                rec["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            records.append(rec)
        for name, reason in skipped.items():
            records.append(dict(op="segment_attention", mode=mode, backend=name, shape=shape,
                                status=f"skipped: {reason}"))
        for rec in records:
            if rec.get("mode") == mode and rec["backend"] == "triton" and "ms" in rec:
                rec["speedup_vs"] = {peer: ms[peer] / rec["ms"] for peer in ms if peer != "triton"}
        line = "  ".join(f"{name}={val:.3f}ms" for name, val in ms.items())
        print(f"{model:10s} T={t:5d} N={n} S={s:3d} {mode:6s} {line}", flush=True)
    return records


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="one tiny case (seconds; works on the CPU)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--T", nargs="+", type=int, default=[2048, 8192])
    ap.add_argument("--S", nargs="+", type=int, default=[31, 79])
    ap.add_argument("--N", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--peers", nargs="+", default=["flex", "sdpa"], choices=["flex", "sdpa", "torch"])
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rep", type=int, default=20)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/segment_attention_<device>.json)")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    if args.smoke:
        args.models, args.T, args.S, args.N = ["smollm2"], [24], [5], 3
        args.warmup, args.rep = 1, 2
        if device.type == "cpu":
            args.peers = ["sdpa", "torch"]
            dtype = torch.float32 if args.dtype == "bf16" else dtype  # bf16 dots are emulated in the interpreter
    import triton
    from cacheaug_engine.triton_kernels import segment_attention_configs as cfgs

    records = []
    t0 = time.time()
    for model in args.models:
        for t in args.T:
            for s in args.S:
                records.extend(bench_case(model, t, args.N, s, dtype, args, device))
    result = dict(
        benchmark="segment_attention", smoke=args.smoke,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        interpreter=os.environ.get("TRITON_INTERPRET") == "1",
        versions=dict(torch=torch.__version__, triton=triton.__version__, python=sys.version.split()[0],
                      cuda=torch.version.cuda),
        commit=git_commit(), autotune=cfgs.autotune_enabled(),
        flop_model="4*Dh per visible score forward, 14*Dh forward+backward (visible scores only)",
        wall_s=round(time.time() - t0, 2), records=records,
    )
    default = Path(__file__).resolve().parent / "results" / (
        f"segment_attention_{'smoke_' if args.smoke else ''}{device.type}.json")
    out = Path(args.out) if args.out else default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    bad = [r for r in records if r["backend"] == "triton" and r.get("status") != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

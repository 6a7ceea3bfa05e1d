"""Training-step speed and loss by precision on the CPU: fp32 against bf16 autocast, bf16 frozen weights
and fp32 with ``--compile`` (the decoder's element-wise regions under torch.compile).

One run, one process: four Trainers on the same default decoder weights, data and seeds (the
addition recipe of cacheaug_engine/assets/addition-coprocessor/COMMAND.md, N_L 4, LoRA 8), stepped
in turn (order rotating), so every step of every precision sees the same batch and the same
machine load. Reported: per precision the median step time, the paired ratio of fp32's step time
to its step time (> 1: faster than fp32) with a distribution-free 95% interval, tokens/s, and the
loss curve (mean of the last 20 steps against fp32's, on identical batches), each mode's warm-up
seconds (compilation, for ``compile``) and what the CPU offers (torch's CPU capability, oneDNN bf16).

    python -m bench.train_precision --steps 100 --out bench/results/train_precision_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .cpu_peer import median_interval
from .timing import device_name, git_commit

# mode -> the TrainConfig settings that make it
MODES: dict[str, dict[str, Any]] = {
    "fp32": {"precision": "fp32"},
    "compile": {"precision": "fp32", "compile": True},
    "bf16": {"precision": "bf16"},
    "bf16-weights": {"precision": "bf16-weights"},
}


def run(steps: int, warmup: int, out: Path | None, threads: int | None, modes: list[str]) -> dict[str, Any]:
    """Step every precision's Trainer ``steps`` times in turn; returns (and writes) the record."""
    from tqdm import tqdm

    from cacheaug_engine.data.tasks import write_task
    from cacheaug_engine.device import slow_bf16_note
    from cacheaug_engine.train.config import TrainConfig
    from cacheaug_engine.train.trainer import Trainer

    if threads:
        torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="cacheaug-precision-"))
    data = write_task(tmp / "add.jsonl", "addition")
    base = dict(data=[str(data)], num_latents=4, placement="early", ahead=8, positions=8, min_prefix=8, seq_len=64,
                batch_size=4, lora_rank=8, lr=3e-3, warmup=10, steps=steps + warmup, save_every=0, eval_every=0,
                seed=0, device="cpu")
    names = ["fp32", *(m for m in modes if m != "fp32")]  # fp32 is the reference of every ratio
    trainers = {m: Trainer(TrainConfig(**base, **MODES[m], out=str(tmp / m)), log=lambda _m: None) for m in names}
    for t in trainers.values():
        t.coprocessor.train()
    seconds: dict[str, list[float]] = {m: [] for m in names}
    warm: dict[str, float] = {m: 0.0 for m in names}
    loss: dict[str, list[float]] = {m: [] for m in names}
    for i in tqdm(range(steps + warmup), desc="precision steps", unit="round"):
        order = names[i % len(names):] + names[: i % len(names)]
        for m in order:
            t0 = time.perf_counter()
            row = trainers[m].step()
            dt = time.perf_counter() - t0
            if i >= warmup:
                seconds[m].append(dt)
            else:  # compilation happens here, for "compile"
                warm[m] += dt
            loss[m].append(row["loss"])
    tok_per_step = base["batch_size"] * base["seq_len"]
    res: dict[str, Any] = {
        "bench": "train_precision", "device": device_name(torch.device("cpu")), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "steps": steps, "warmup": warmup, "recipe": base, "modes": {},
        "commit": git_commit(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_bf16": slow_bf16_note(torch.device("cpu"), torch.bfloat16) is None,
    }
    ref_last = statistics.fmean(loss["fp32"][-20:])
    for m in names:
        ratios = [a / b for a, b in zip(seconds["fp32"], seconds[m], strict=True)]
        lo, hi = median_interval(ratios)
        last = statistics.fmean(loss[m][-20:])
        res["modes"][m] = {
            "settings": MODES[m], "warmup_s": warm[m], "step_s_median": statistics.median(seconds[m]),
            "tokens_per_s": tok_per_step / statistics.median(seconds[m]),
            "speedup_vs_fp32_median": statistics.median(ratios), "speedup_vs_fp32_ci95": [lo, hi],
            "loss_last20_mean": last, "loss_last20_vs_fp32": last - ref_last, "loss_curve": loss[m],
        }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100, help="timed steps per precision")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps per precision")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON record")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), help="fp32 always runs")
    a = p.parse_args(argv)
    if a.steps < 2 or a.warmup < 0:
        p.error("--steps must be >= 2 and --warmup >= 0")
    res = run(a.steps, a.warmup, a.out, a.threads, a.modes)
    for m, r in res["modes"].items():
        lo, hi = r["speedup_vs_fp32_ci95"]
        print(f"{m:13s} warm-up {r['warmup_s']:.1f} s  {r['step_s_median']:.3f} s/step  {r['tokens_per_s']:.0f} tok/s  "
              f"x{r['speedup_vs_fp32_median']:.2f} [{lo:.2f}, {hi:.2f}] vs fp32  "
              f"loss(last 20) {r['loss_last20_mean']:.4f} ({r['loss_last20_vs_fp32']:+.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

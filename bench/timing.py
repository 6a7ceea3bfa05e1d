"""Timing, peak-throughput and environment probes shared by every benchmark module.

On CUDA: warm-up calls, then `repeats` timed calls, each preceded by an L2 flush (a
256 MB buffer is overwritten) and timed with CUDA events; the median is reported.
On the CPU: wall-clock medians (perf_counter), no flush - good for smoke runs only.
Nothing here touches CUDA at import time.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024


@dataclass
class Timing:
    ms: float  # median
    ms_min: float
    ms_max: float
    repeats: int


class Timer:
    """Median-of-repeats timer for one device (see module doc)."""

    def __init__(
        self, device: torch.device, warmup: int = 3, repeats: int = 10, flush_l2: bool = True
    ) -> None:
        self.device = torch.device(device)
        self.warmup = warmup
        self.repeats = repeats
        self.flush_l2 = flush_l2 and self.device.type == "cuda"
        self._flush_buf: torch.Tensor | None = None

    def _flush(self) -> None:
        if not self.flush_l2:
            return
        if self._flush_buf is None:
            self._flush_buf = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=self.device)
        self._flush_buf.zero_()

    def __call__(self, fn: Callable[[], object], setup: Callable[[], object] | None = None) -> Timing:
        """Time ``fn()``; ``setup()`` (untimed) runs before every call, e.g. to zero grads."""
        for _ in range(self.warmup):
            if setup is not None:
                setup()
            fn()
        times: list[float] = []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
            for i in range(self.repeats):
                if setup is not None:
                    setup()
                self._flush()
                starts[i].record()
                fn()
                ends[i].record()
            torch.cuda.synchronize(self.device)
            times = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
        else:
            for _ in range(self.repeats):
                if setup is not None:
                    setup()
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return Timing(statistics.median(times), min(times), max(times), len(times))


def sync(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak allocated CUDA memory since the last reset, in MiB (None on the CPU)."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure_peaks(device: torch.device, smoke: bool = False) -> dict[str, object]:
    """Measured (not datasheet) peaks: dense matmul TFLOP/s and device copy GB/s.

    CUDA: bf16 8192^3 matmul and a 1 GiB device-to-device copy. CPU: fp32 matmul and
    a 64 MiB copy (bf16 matmul is not representative on most CPUs).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    n = 8192 if cuda else (256 if smoke else 1024)
    timer = Timer(device, warmup=3 if cuda else 1, repeats=20 if cuda else 3, flush_l2=False)
    peaks: dict[str, object] = {"matmul_dtype": str(dtype).replace("torch.", ""), "matmul_n": n}
    try:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t = timer(lambda: torch.mm(a, b))
        peaks["matmul_tflops"] = 2 * n**3 / (t.ms * 1e-3) / 1e12

    except Exception as exc:  # noqa: BLE001 - a failed probe is recorded, not fatal
        peaks["matmul_tflops"] = None
        peaks["matmul_error"] = f"{type(exc).__name__}: {exc}"
    nbytes = (1 << 30) if cuda else ((16 if smoke else 64) << 20)
    try:
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
        dst = torch.empty_like(src)
        t = timer(lambda: dst.copy_(src))
        peaks["copy_gbps"] = 2 * nbytes / (t.ms * 1e-3) / 1e9  # read + write
        peaks["copy_bytes"] = nbytes

    except Exception as exc:  # noqa: BLE001
        peaks["copy_gbps"] = None
        peaks["copy_error"] = f"{type(exc).__name__}: {exc}"
    return peaks


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {name} ({torch.get_num_threads()} threads)"


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001
        return None
    return str(getattr(mod, "__version__", "unknown"))


def versions() -> dict[str, str | None]:
    return {
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "cacheaug_engine": _version("cacheaug_engine"),
        "flash_attn": _version("flash_attn"),
        "flashinfer": _version("flashinfer"),
    }


def git_commit() -> str | None:
    """HEAD (+ "-dirty"), or CACHEAUG_GIT_COMMIT where set (a copy of the tree without .git)."""
    given = os.environ.get("CACHEAUG_GIT_COMMIT")
    if given:
        return given
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
            text=True, timeout=10,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - not a git checkout (installed wheel)
        return None


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

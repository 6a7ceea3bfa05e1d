"""Result records, the per-run context, and the JSON file every run writes.

A benchmark case is measured by :meth:`BenchContext.measure`, which never raises: an
out-of-memory error, an unavailable backend or any other failure becomes the record's
``status`` ("oom: ...", "unavailable: ...", "error: ...") and the run goes on.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cacheaug_engine.ops.backends import BackendUnavailableError

from . import timing

SCHEMA_VERSION = 1
RECORD_KEYS = (
    "op", "backend", "shape", "dtype", "ms", "tflops", "gbps", "pct_peak", "speedup_vs", "peak_mem_mb",
    "status",
)


class Unavailable(Exception):
    """Raised by a benchmark case whose backend or peer cannot run here (with the reason)."""


@dataclass
class Record:
    op: str
    backend: str
    shape: dict[str, Any]
    dtype: str
    ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    pct_peak: float | None = None
    speedup_vs: dict[str, float] = field(default_factory=dict)
    peak_mem_mb: float | None = None
    status: str = "ok"
    group: str = ""  # records in one group share op and shape: speedups are taken inside it
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("ms", "tflops", "gbps", "pct_peak", "peak_mem_mb"):
            if out[key] is not None:
                out[key] = round(float(out[key]), 6)
        out["speedup_vs"] = {k: round(v, 4) for k, v in out["speedup_vs"].items()}
        return out


def is_peer(backend: str) -> bool:
    return backend.startswith("peer:")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class Work:
    """What one call does: useful FLOPs and/or bytes (for TFLOP/s, GB/s, % of peak)."""

    flops: float | None = None
    bytes: float | None = None
    memory_bound: bool = False
    tokens: float | None = None  # for end-to-end rows: tokens per call -> tokens/s


class BenchContext:
    """Per-run state: device, timer, measured peaks, records, time budget, progress bar."""

    def __init__(
        self, device: torch.device, *, smoke: bool = False, repeats: int | None = None,
        warmup: int | None = None, time_budget_s: float | None = None, progress: bool = True,
        peaks: dict[str, Any] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.smoke = smoke
        cuda = self.device.type == "cuda"
        self.timer = timing.Timer(
            self.device,
            warmup=warmup if warmup is not None else (5 if cuda else 1),
            repeats=repeats if repeats is not None else (20 if cuda else (2 if smoke else 5)),
        )
        self.records: list[Record] = []
        self.t_start = time.monotonic()
        self.time_budget_s = time_budget_s
        self.progress = progress
        self.peaks = peaks if peaks is not None else timing.measure_peaks(self.device, smoke=smoke)
        self._bar: Any = None

    # -- progress ---------------------------------------------------------------------
    def start_section(self, name: str, total: int) -> None:
        self.close_section()
        if self.progress:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # progress bars are optional on bare benchmark machines
                self.progress = False
                return
            self._bar = tqdm(total=total, desc=name, unit="case", leave=True, dynamic_ncols=True)

    def close_section(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _tick(self, label: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(label[:60])
            self._bar.update(1)

    def over_budget(self) -> bool:
        return self.time_budget_s is not None and time.monotonic() - self.t_start > self.time_budget_s

    # -- measuring --------------------------------------------------------------------
    def measure(
        self, op: str, backend: str, shape: dict[str, Any], dtype: torch.dtype,
        prepare: Callable[[], tuple[Callable[[], object], Callable[[], object] | None, Work]],
        *, group: str | None = None, note: str | None = None,
    ) -> Record:
        """Build the case with ``prepare()`` -> (fn, setup, work), time it, store a Record.

        ``prepare`` does all allocation and compilation outside the timed region; it may
        raise :class:`Unavailable`. Any exception becomes the record's status.
        """
        rec = Record(op=op, backend=backend, shape=dict(shape), dtype=dtype_name(dtype),
                     group=group or f"{op}|{json.dumps(shape, sort_keys=True)}")
        if note:
            rec.extra["note"] = note
        if self.over_budget():
            rec.status = "skipped: time budget exhausted"
            self.records.append(rec)
            self._tick(f"{op} {backend} skipped")
            return rec
        try:
            timing.reset_peak_memory(self.device)
            fn, setup, work = prepare()
            if self._interpreted(backend):
                # Triton interpreter on the CPU: a correctness smoke, not a timing - one call.
                t = timing.Timer(self.device, warmup=0, repeats=1, flush_l2=False)(fn, setup)
                rec.extra["note"] = "TRITON_INTERPRET=1 (interpreter on the CPU; time is not meaningful)"
            else:
                t = self.timer(fn, setup)
            rec.ms = t.ms
            rec.extra.update({"ms_min": t.ms_min, "ms_max": t.ms_max, "repeats": t.repeats})
            rec.peak_mem_mb = timing.peak_memory_mb(self.device)
            self._derive(rec, work)
        except (Unavailable, BackendUnavailableError, NotImplementedError) as exc:
            rec.status = f"unavailable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, never fatal
            kind = "oom" if timing.is_oom(exc) else "error"
            rec.status = f"{kind}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        finally:
            fn = setup = None  # noqa: F841 - drop references before freeing memory
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.records.append(rec)
        self._tick(f"{op} {backend} {rec.status if rec.status != 'ok' else f'{rec.ms:.3f} ms'}")
        return rec

    def _interpreted(self, backend: str) -> bool:
        return self.device.type == "cpu" and backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"

    def _derive(self, rec: Record, work: Work) -> None:
        sec = rec.ms * 1e-3 if rec.ms else None
        if not sec:
            return
        peak_tf = self.peaks.get("matmul_tflops")
        peak_bw = self.peaks.get("copy_gbps")
        if work.flops is not None:
            rec.tflops = work.flops / sec / 1e12
        if work.bytes is not None:
            rec.gbps = work.bytes / sec / 1e9
        if work.memory_bound and rec.gbps is not None and peak_bw:
            rec.pct_peak = 100.0 * rec.gbps / float(peak_bw)
        elif not work.memory_bound and rec.tflops is not None and peak_tf:
            rec.pct_peak = 100.0 * rec.tflops / float(peak_tf)
        if work.tokens is not None:
            rec.extra["tokens_per_s"] = work.tokens / sec
        if work.flops is not None:
            rec.extra["flops"] = work.flops
        if work.bytes is not None:
            rec.extra["bytes"] = work.bytes

    def add(self, rec: Record) -> None:
        """Store a record built by hand (e.g. a whole section that is unavailable)."""
        self.records.append(rec)
        self._tick(f"{rec.op} {rec.backend} {rec.status}")


def fill_speedups(records: list[Record]) -> None:
    """speedup_vs[other] = other.ms / ms for each of our backends vs every other ok record in its group."""
    groups: dict[str, list[Record]] = {}
    for rec in records:
        groups.setdefault(rec.group, []).append(rec)
    for members in groups.values():
        ok = [r for r in members if r.status == "ok" and r.ms]
        for rec in ok:
            if is_peer(rec.backend):
                continue
            rec.speedup_vs = {o.backend: o.ms / rec.ms for o in ok if o is not rec}


def write_results(
    path: str | Path, ctx: BenchContext, sections: list[str], *, smoke: bool,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    fill_speedups(ctx.records)
    doc: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "device": timing.device_name(ctx.device),
        "device_type": ctx.device.type,
        "versions": timing.versions(),
        "commit": timing.git_commit(),
        "date": timing.now_iso(),
        "smoke": smoke,
        "sections": sections,
        "wall_s": round(time.monotonic() - ctx.t_start, 2),
        "peaks": ctx.peaks,
        "records": [r.to_json() for r in ctx.records],
    }
    if extra:
        doc.update(extra)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return doc


def validate_results(doc: dict[str, Any]) -> list[str]:
    """Schema problems of a results document (empty list = valid)."""
    top = ("device", "versions", "commit", "date", "peaks", "records")
    problems = [f"missing top-level key {k!r}" for k in top if k not in doc]
    for key in ("torch", "triton", "python", "cuda"):
        if key not in doc.get("versions", {}):
            problems.append(f"versions lacks {key!r}")
    for i, rec in enumerate(doc.get("records", [])):
        missing = [k for k in RECORD_KEYS if k not in rec]
        if missing:
            problems.append(f"record {i} lacks {missing}")
        elif rec["status"] == "ok" and rec["ms"] is None:
            problems.append(f"record {i} is ok but has no ms")
    return problems

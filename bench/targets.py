"""Issue 25's performance targets, judged on benchmark result documents (bench/records.py format).

Each target names an op, the shapes it is judged on, our backends, and either a peer
(a speedup: peer ms / our ms, measured in the same run) or a fraction of a peak the
same run measured (% of the bf16 matmul rate or of the copy bandwidth). A target is
"met" when every measured shape meets it, "not met" when one does not, and "not
measured" when no shape has both figures (each entry then says why: skipped for time,
an error, a peer that does not import). Nothing is estimated: a missing figure stays
missing.

Standard library only, so bench/gpu_check.py can import it before the package is
installed. ``strict_shapes=False`` (the CPU rehearsal) judges every shape of the op,
to exercise this code on smoke shapes; its verdicts are about CPU smoke figures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SEGMENT_MODELS = ("gemma2-2b", "llama3-8b", "smollm2-135m")


@dataclass(frozen=True)
class Target:
    """One target: ``ours`` on ``op`` vs ``peer`` (speedup) or vs a measured peak (percent)."""

    name: str
    text: str
    op: str
    ours: tuple[str, ...]
    threshold: float
    shapes: Callable[[dict[str, Any]], bool]
    peer: str | None = None  # None: percent of the peak that ``peak`` names
    peak: str | None = None  # "matmul_tflops" or "copy_gbps"

    @property
    def kind(self) -> str:
        return "speedup" if self.peer is not None else "pct_peak"


def _segment_shape(r: dict[str, Any]) -> bool:
    return (r.get("model") in SEGMENT_MODELS and r.get("t") in (2048, 8192) and r.get("n") == 64
            and r.get("s") in (31, 79))


def _llama_8k(r: dict[str, Any]) -> bool:
    return _segment_shape(r) and r.get("model") == "llama3-8b" and r.get("t") == 8192


def _decode_long(r: dict[str, Any]) -> bool:
    return (r.get("t") or 0) >= 32768


def _cascade_32x16k(r: dict[str, Any]) -> bool:
    return r.get("b") == 32 and r.get("t") == 16384


def _train_shape(r: dict[str, Any]) -> bool:
    return r.get("recipe") is None  # the bench's N = 64 cases; the recipe's 8 positions cap the loop ratio


TARGETS: tuple[Target, ...] = (
    Target("segment_fwdbwd_vs_flex", "segment attention fwd+bwd >= 1.5x compiled FlexAttention (same mask)",
           "segment_attention.fwdbwd", ("triton",), 1.5, _segment_shape, peer="peer:flex_compiled"),
    Target("segment_fwdbwd_vs_sdpa_dense", "segment attention fwd+bwd >= 10x SDPA on concatenated keys, dense mask",
           "segment_attention.fwdbwd", ("triton",), 10.0, _segment_shape, peer="peer:sdpa_dense"),
    Target("segment_fwd_pct_matmul_peak", "segment attention fwd >= 50% of the run's bf16 matmul peak "
           "(useful TFLOP/s, Llama-3-8B heads, T 8k)",
           "segment_attention.fwd", ("triton",), 50.0, _llama_8k, peak="matmul_tflops"),
    Target("decode_pct_copy_bw", "decode >= 85% of the run's copy bandwidth at T >= 32k",
           "decode_attention", ("cuda", "triton"), 85.0, _decode_long, peak="copy_gbps"),
    Target("cascade_vs_per_request_decode", "cascade decode of 32 requests over a 16k prompt >= 20x "
           "per-request decode without sharing", "cascade_decode", ("cuda", "triton"), 20.0, _cascade_32x16k,
           peer="peer:decode_copies"),
    Target("train_vs_naive_loop", "training step >= 10x the naive per-position loop (tokens/s)",
           "train_step", ("default",), 10.0, _train_shape, peer="peer:naive_loop"),
    Target("train_vs_flex", "training step >= 1.3x the flex backend (tokens/s)",
           "train_step", ("default",), 1.3, _train_shape, peer="flex"),
)


def _shape_key(rec: dict[str, Any]) -> str:
    return repr(sorted((rec.get("shape") or {}).items()))


def _compact(shape: dict[str, Any]) -> dict[str, Any]:
    keep = ("model", "t", "n", "s", "b", "B", "T", "N", "N_L", "recipe")
    return {k: shape[k] for k in keep if k in shape}


def _ok(rec: dict[str, Any] | None) -> bool:
    return rec is not None and rec.get("status") == "ok" and bool(rec.get("ms"))


def _entry(target: Target, recs: list[dict[str, Any]], peaks: dict[str, Any]) -> dict[str, Any]:
    """One shape's verdict: our fastest ok backend vs the peer or the peak."""
    shape = recs[0].get("shape") or {}
    mine = [r for r in recs if r.get("backend") in target.ours]
    ok = [r for r in mine if _ok(r)]
    entry: dict[str, Any] = {"shape": _compact(shape)}
    if not ok:
        why = "; ".join(f"{r['backend']}: {r.get('status')}" for r in mine) or "no record of our backends"
        return {**entry, "value": None, "met": None, "why": why}
    best = min(ok, key=lambda r: r["ms"])
    entry.update(ours=best["backend"], ours_ms=best["ms"])
    if target.peer is not None:
        peer = next((r for r in recs if r.get("backend") == target.peer), None)
        if not _ok(peer):
            why = f"{target.peer}: {peer.get('status') if peer else 'no record'}"
            return {**entry, "value": None, "met": None, "why": why}
        value = peer["ms"] / best["ms"]
        entry.update(peer_ms=peer["ms"])
    else:
        peak = peaks.get(target.peak or "")
        if not peak:
            return {**entry, "value": None, "met": None, "why": f"the run measured no {target.peak}"}
        measured = best.get("tflops") if target.peak == "matmul_tflops" else best.get("gbps")
        if measured is None:
            return {**entry, "value": None, "met": None, "why": "our record carries no rate"}
        value = 100.0 * float(measured) / float(peak)
        entry.update(rate=measured, peak=peak)
    return {**entry, "value": round(value, 4), "met": value >= target.threshold}


def evaluate(docs: list[dict[str, Any]], strict_shapes: bool = True) -> dict[str, Any]:
    """Every target's verdict over the records of ``docs`` (one run's result documents)."""
    records = [r for d in docs for r in d.get("records", [])]
    peaks: dict[str, Any] = {}
    for d in docs:
        for key, val in (d.get("peaks") or {}).items():
            peaks.setdefault(key, val)
    out: dict[str, Any] = {}
    for target in TARGETS:
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            if r.get("op") != target.op:
                continue
            if strict_shapes and not target.shapes(r.get("shape") or {}):
                continue
            groups.setdefault(_shape_key(r), []).append(r)
        entries = [_entry(target, recs, peaks) for recs in groups.values()]
        judged = [e for e in entries if e["met"] is not None]
        if not judged:
            status = "not measured"
        else:
            status = "met" if all(e["met"] for e in judged) else "not met"
        worst = min((e["value"] for e in judged), default=None)
        out[target.name] = {
            "text": target.text, "kind": target.kind, "threshold": target.threshold,
            "unit": "x" if target.kind == "speedup" else "% of peak",
            "status": status, "worst": worst, "measured_shapes": len(judged), "shapes": len(entries),
            "entries": entries,
        }
        if not entries:
            out[target.name]["why"] = f"no {target.op} record at the target's shapes"
    return out


def table(result: dict[str, Any]) -> list[str]:
    """A short text table of ``evaluate``'s verdicts (one line per target)."""
    lines = []
    for name, t in result.items():
        worst = "-" if t["worst"] is None else f"{t['worst']:.3g}{'x' if t['kind'] == 'speedup' else '%'}"
        need = f"{t['threshold']:g}{'x' if t['kind'] == 'speedup' else '%'}"
        lines.append(f"{name:32s} {t['status']:13s} worst {worst:>9s} (need >= {need}) "
                     f"on {t['measured_shapes']}/{t['shapes']} shapes")
    return lines

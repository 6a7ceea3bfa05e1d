"""Render result JSONs to PNG plots (speedup vs T per peer, one figure per op) and a Markdown table.

    cacheaug bench plot bench/results/h100-*.json --out bench/results/h100.md --plot-dir bench/results/plots
    python -m cacheaug_engine.bench.plot FILE.json ...        (same, with defaults)

"Ours" for a shape is our fastest backend that ran (backend names without "peer:");
each peer's line is peer_ms / ours_ms, so > 1 means we are faster. Only records
measured in the same run are ever compared.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

SPEEDUP_OPS = ("segment_attention.fwd", "segment_attention.fwdbwd", "decode_attention", "cascade_decode")
SHAPE_KEYS = {
    "segment_attention": ("model", "t", "n", "n_l", "s"),
    "decode_attention": ("model", "b", "t"),
    "cascade_decode": ("model", "b", "t", "suffix"),
    "merge_states": ("rows", "dh"),
    "train_step": ("model", "B", "T", "N", "N_L"),
    "decode_e2e": ("model", "B", "T", "G", "N_L"),
    "generate_n": ("model", "T", "G", "n"),
}


def load(paths: list[str | Path]) -> list[dict[str, Any]]:
    """Result documents; a file that is missing, not JSON or not a bench result raises an error naming it."""
    from .records import validate_results

    docs = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such result file (expected a JSON file written by cacheaug bench)")
        try:
            doc = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a bench result (not valid JSON: {e})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("records"), list):
            raise ValueError(f"{path}: not a bench result (expected a JSON object with a 'records' list)")
        problems = validate_results(doc)
        if problems:
            raise ValueError(f"{path}: not a bench result ({'; '.join(problems[:3])})")
        doc["_path"] = str(p)
        docs.append(doc)
    return docs


def _is_peer(backend: str) -> bool:
    return backend.startswith("peer:")


def _shape_key(rec: dict[str, Any], drop: tuple[str, ...] = ()) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in rec["shape"].items() if k not in drop))


def best_ours(records: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """(op, shape key) -> our fastest ok record."""
    best: dict[tuple, dict[str, Any]] = {}
    for r in records:
        if r["status"] != "ok" or not r["ms"] or _is_peer(r["backend"]):
            continue
        key = (r["op"], _shape_key(r))
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    return best


def speedups(records: list[dict[str, Any]]) -> dict[tuple, dict[str, float]]:
    """(op, shape key) -> {peer: peer_ms / best_ours_ms} over ok peers of the same run."""
    best = best_ours(records)
    out: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in records:
        if r["status"] != "ok" or not r["ms"] or not _is_peer(r["backend"]):
            continue
        key = (r["op"], _shape_key(r))
        if key in best:
            out[key][r["backend"][5:]] = r["ms"] / best[key]["ms"]
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80]


def plot_speedups(doc: dict[str, Any], plot_dir: str | Path) -> list[Path]:
    """One PNG per op: speedup of our best backend over each peer vs T, one panel per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    sp = speedups(doc["records"])
    tag = _slug(Path(doc.get("_path", "results")).stem)
    written = []
    for op in SPEEDUP_OPS:
        # series: shape without T -> {peer: [(T, speedup)]}
        series: dict[tuple, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
        for (rop, skey), peers in sp.items():
            if rop != op:
                continue
            shape = dict(skey)
            rest = tuple((k, v) for k, v in skey if k != "t")
            for peer, val in peers.items():
                series[rest][peer].append((int(shape["t"]), val))
        series = {k: v for k, v in series.items() if any(len(pts) >= 1 for pts in v.values())}
        if not series:
            continue
        # keep the series with the most T points per model (the T sweep), at most 4 panels
        by_model: dict[str, tuple] = {}
        for rest, peers in series.items():
            model = dict(rest).get("model", "")
            npts = max(len(p) for p in peers.values())
            if model not in by_model or npts > max(len(p) for p in series[by_model[model]].values()):
                by_model[model] = rest
        keys = list(by_model.values())[:4]
        fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.8), squeeze=False)
        for ax, rest in zip(axes[0], keys, strict=True):
            for peer, pts in sorted(series[rest].items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=peer)
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("T (prefix / cache length)")
            ax.set_ylabel("speedup of ours (x)")
            desc = ", ".join(f"{k}={v}" for k, v in rest if k in ("model", "n", "n_l", "b", "suffix"))
            ax.set_title(desc, fontsize=9)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.suptitle(f"{op} on {doc['device']} ({doc.get('date', '')[:10]})", fontsize=10)
        fig.tight_layout()
        path = plot_dir / f"{tag}-{_slug(op)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _sig(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def _shape_text(rec: dict[str, Any]) -> str:
    family = rec["op"].split(".")[0]
    keys = SHAPE_KEYS.get(family, tuple(rec["shape"]))
    return " ".join(f"{k}={rec['shape'][k]}" for k in keys if k in rec["shape"])


def markdown_table(doc: dict[str, Any]) -> str:
    """README-ready Markdown: header naming the device, then one table per op."""
    peaks = doc.get("peaks", {})
    v = doc.get("versions", {})
    lines = [
        f"### Performance on {doc['device']}",
        "",
        f"Measured {doc.get('date', '?')} at commit `{doc.get('commit') or '?'}` "
        f"with torch {v.get('torch')}, "
        f"triton {v.get('triton')}, CUDA {v.get('cuda')}. Measured peaks in the same run: "
        f"{_fmt(peaks.get('matmul_tflops'), 1)} TFLOP/s ({peaks.get('matmul_dtype')} matmul), "
        f"{_fmt(peaks.get('copy_gbps'), 0)} GB/s (device copy)."
        + (" **Smoke run: tiny shapes, timings not meaningful.**" if doc.get("smoke") else ""),
        "",
    ]
    recs = doc["records"]
    best = best_ours(recs)
    sp = speedups(recs)
    ops = list(dict.fromkeys(r["op"] for r in recs))
    for op in ops:
        keys = [k for k in best if k[0] == op]
        if op in ("train_step", "decode_e2e", "generate_n"):
            rows = [r for r in recs if r["op"] == op]
            lines += [f"#### {op}", "", "| shape | backend | ms | tokens/s | peak MiB | status |",
                      "|---|---|---:|---:|---:|---|"]
            for r in rows:
                tps = r.get("extra", {}).get("tokens_per_s")
                lines.append(f"| {_shape_text(r)} | {r['backend']} | {_fmt(r['ms'])} | {_fmt(tps, 0)} | "
                             f"{_fmt(r['peak_mem_mb'], 0)} | {r['status'][:60]} |")
            lines.append("")
            continue
        if not keys:
            lines += [f"#### {op}", "", "no successful run of our backends in this file", ""]
            continue
        peers = sorted({p for k in keys for p in sp.get(k, {})})
        mem_bound = op in ("decode_attention", "cascade_decode", "merge_states")
        unit = "GB/s" if mem_bound else "TFLOP/s"
        head = ["shape", "ours", "ms", unit, "% peak", "peak MiB", *[f"vs {p}" for p in peers]]
        lines += [f"#### {op}", "", "| " + " | ".join(head) + " |",
                  "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
        for k in keys:
            r = best[k]
            rate = r["gbps"] if mem_bound else r["tflops"]
            cells = [_shape_text(r), r["backend"], _fmt(r["ms"], 3), _sig(rate), _fmt(r["pct_peak"], 1),
                     _fmt(r["peak_mem_mb"], 0)]
            cells += [f"{sp[k][p]:.2f}x" if p in sp.get(k, {}) else "-" for p in peers]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    bad = [r for r in recs if r["status"] != "ok" and not r["status"].startswith("unavailable")]
    if bad:
        lines += [f"{len(bad)} case(s) failed or were skipped (OOM, errors, time budget); see the JSON.", ""]
    return "\n".join(lines)


def render(paths: list[str | Path], plot_dir: str | Path, out_md: str | Path | None) -> list[Path]:
    """Plots for every file, and one Markdown file with every file's tables."""
    docs = load(paths)
    written: list[Path] = []
    for doc in docs:
        written += plot_speedups(doc, plot_dir)
    if out_md is not None:
        out = Path(out_md)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n\n".join(markdown_table(d) for d in docs) + "\n")
        written.append(out)
    return written


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m cacheaug_engine.bench.plot", description=__doc__)
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--out", default=None, help="Markdown file (default: first input with .md)")
    ap.add_argument("--plot-dir", default=None, help="PNG folder (default: plots/ beside the Markdown)")
    a = ap.parse_args(argv)
    out_md = a.out or str(Path(a.inputs[0]).with_suffix(".md"))
    for p in render(a.inputs, a.plot_dir or str(Path(out_md).parent / "plots"), out_md):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tables of a controlled evaluation: per-position perplexity per method and the coprocessor's
paired change against each reference, with 95% intervals over held-out sequences."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

METHODS = ("decoder", "pause", "coprocessor", "shuffled", "mean")
REFERENCES = ("decoder", "pause", "shuffled", "mean")
Z95 = 1.959964


def paired_interval(a: Tensor, b: Tensor) -> tuple[float, float, float]:
    """Mean of a - b over rows (the unit) and its 95% normal interval: (mean, lo, hi), in CE nats."""
    d = (a.double() - b.double()).flatten()
    m = float(d.mean())
    if d.numel() < 2:
        return m, float("nan"), float("nan")
    half = Z95 * float(d.std(unbiased=True)) / math.sqrt(d.numel())
    return m, m - half, m + half


def _pct(x: float) -> float:
    return 100.0 * math.expm1(x)


def controls_table(result: dict[str, Any], *, mean_upto: int | None = None) -> dict[str, Any]:
    """Per-position rows from :func:`evaluate_controls` (positions 1..N_A, then "mean 1-K").

    Returns {"positions", "ce": {method: [...]}, "ppl": {method: [...]}, "change_pct":
    {reference: [(change, lo, hi), ...]} (coprocessor's paired perplexity change in %, with its
    95% interval), "cache_dependence", "num_sequences", "points_per_sequence"}.
    """
    na = result["ahead"]
    k = min(mean_upto or na, na)
    ce = {m: torch.tensor(v, dtype=torch.float64) for m, v in result["ce"].items()}  # [n, N_A]
    cols = {m: [v[:, i] for i in range(na)] + [v[:, :k].mean(1)] for m, v in ce.items()}
    positions: list[Any] = list(range(1, na + 1)) + [f"mean 1-{k}"]
    out: dict[str, Any] = {
        "positions": positions,
        "ce": {m: [float(c.mean()) for c in cs] for m, cs in cols.items()},
        "change_pct": {},
        "cache_dependence": result.get("cache_dependence"),
        "num_sequences": result.get("num_sequences"),
        "points_per_sequence": result.get("points_per_sequence"),
    }
    out["ppl"] = {m: [math.exp(x) for x in v] for m, v in out["ce"].items()}
    for ref in REFERENCES:
        if ref in cols and "coprocessor" in cols:
            trip = [paired_interval(c, r) for c, r in zip(cols["coprocessor"], cols[ref], strict=True)]
            out["change_pct"][ref] = [tuple(_pct(x) for x in tr) for tr in trip]
    return out


def format_controls(table: dict[str, Any], title: str | None = None) -> str:
    """Aligned text: perplexity per method, then the coprocessor's change vs each reference [95% CI]."""
    methods = [m for m in METHODS if m in table["ppl"]]
    refs = [r for r in REFERENCES if r in table["change_pct"]]
    lines = [title] if title else []
    head = f"{'position':>9} " + " ".join(f"{m:>11}" for m in methods)
    head += "   " + " ".join(f"{'copro vs ' + r:>27}" for r in refs)
    lines.append(head)
    for i, p in enumerate(table["positions"]):
        row = f"{p!s:>9} " + " ".join(f"{table['ppl'][m][i]:>11.3f}" for m in methods) + "   "
        cells = []
        for r in refs:
            c, lo, hi = table["change_pct"][r][i]
            cells.append(f"{c:+6.2f}% [{lo:+6.2f}, {hi:+6.2f}]".rjust(27))
        lines.append(row + " ".join(cells))
    lines.append(
        f"perplexity per method; change = coprocessor's paired perplexity change in % with a 95% interval "
        f"over {table['num_sequences']} sequences ({table['points_per_sequence']} points each). "
        f"Cache dependence (RMS of per-point latent deviation / latent RMS): {table['cache_dependence']:.4f}"
    )
    return "\n".join(lines)

"""One table from several lm-eval runs of the same tasks (one run per method: the decoder alone, the
coprocessor, the controls): each method's score per task and metric, and the coprocessor's paired
difference against every other method with a 95% interval over documents (``eval.paired``), from
lm-eval's per-document samples (``log_samples``). Knows lm-eval's output layout, never imports it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cacheaug_engine.eval.paired import paired_difference

_NOT_METRICS = {"alias", "name", "sample_len", "sample_count", "samples"}

# (task, metric, filter) -> {"score": aggregate, "docs": {doc_id: per-document value}}
Scores = dict[tuple[str, str, str], dict[str, Any]]


def per_document_scores(results: dict[str, Any], samples: dict[str, list[dict[str, Any]]]) -> Scores:
    """Aggregate and per-document values of every (task, metric, filter) of one lm-eval run."""
    out: Scores = {}
    for task, res in results.items():
        if task not in samples:
            continue
        for key, value in res.items():
            if "," not in key or "_stderr" in key:
                continue
            metric, filt = key.split(",", 1)
            if metric in _NOT_METRICS or not isinstance(value, (int, float)):
                continue
            docs = {int(s["doc_id"]): float(s[metric]) for s in samples[task]
                    if s.get("filter", "none") == filt and metric in s}
            if docs:
                out[(task, metric, filt)] = {"score": float(value), "docs": docs}
    return out


def paired_rows(runs: dict[str, Scores], reference: str = "coprocessor", level: float = 0.95,
                seed: int = 0) -> list[dict[str, Any]]:
    """One row per (task, metric, filter): every method's score and, when ``reference`` ran, its paired
    difference (reference - other) against every other method on the documents both scored."""
    keys: list[tuple[str, str, str]] = []
    for scores in runs.values():
        keys.extend(k for k in scores if k not in keys)
    rows = []
    for key in keys:
        row: dict[str, Any] = {"task": key[0], "metric": key[1], "filter": key[2], "scores": {}, "diffs": {}}
        for method, scores in runs.items():
            if key in scores:
                row["scores"][method] = scores[key]["score"]
                row.setdefault("docs", len(scores[key]["docs"]))
        ref = runs.get(reference, {}).get(key)
        if ref is not None:
            for method, scores in runs.items():
                if method == reference or key not in scores:
                    continue
                common = sorted(set(ref["docs"]) & set(scores[key]["docs"]))
                if not common:
                    continue
                a = [ref["docs"][d] for d in common]
                b = [scores[key]["docs"][d] for d in common]
                row["diffs"][method] = paired_difference(a, b, level, seed)
        rows.append(row)
    return rows


def _num(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"


def format_rows(rows: list[dict[str, Any]], methods: list[str], reference: str = "coprocessor") -> str:
    """A plain-text table: task, metric, docs, each method's score, then ``reference - X [lo, hi]``."""
    others = [m for m in methods if m != reference]
    head = ["task", "metric", "docs", *methods, *(f"{reference[:5]}-{m[:5]} [95% CI]" for m in others)]
    lines = []
    for r in rows:
        metric = r["metric"] if r["filter"] == "none" else f"{r['metric']} ({r['filter']})"
        cells = [r["task"], metric, str(r.get("docs", ""))]
        cells += [_num(r["scores"][m]) if m in r["scores"] else "-" for m in methods]
        for m in others:
            d = r["diffs"].get(m)
            cells.append("-" if d is None else f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]")
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt.format(*head), sep, *(fmt.format(*c) for c in lines)])


def plot_rows(rows: list[dict[str, Any]], path: str | Path, reference: str = "coprocessor") -> Path:
    """One panel per (task, metric): the reference's paired difference against each other method, 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [r for r in rows if r["diffs"]]
    path = Path(path)
    n = max(1, len(panels))
    fig, axes = plt.subplots(n, 1, figsize=(6.5, 1.0 + 1.2 * n), squeeze=False)
    for ax, r in zip(axes[:, 0], panels, strict=False):
        names = list(r["diffs"])
        d = [r["diffs"][m] for m in names]
        y = list(range(len(names)))
        err = [[x["diff"] - x["lo"] for x in d], [x["hi"] - x["diff"] for x in d]]
        ax.errorbar([x["diff"] for x in d], y, xerr=err, fmt="o", capsize=3)
        ax.axvline(0.0, color="grey", lw=0.8)
        ax.set_yticks(y, [f"- {m}" for m in names])
        metric = r["metric"] if r["filter"] == "none" else f"{r['metric']} ({r['filter']})"
        ax.set_title(f"{r['task']}: {metric}, {reference} minus ... ({r.get('docs', '?')} docs)", fontsize=9)
    if not panels:
        axes[0, 0].text(0.5, 0.5, f"no paired differences ({reference} did not run)", ha="center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

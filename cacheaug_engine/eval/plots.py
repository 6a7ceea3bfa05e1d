"""The per-position perplexity figure shared by `cacheaug eval` and the controls report (Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cacheaug_engine.eval.tables import METHODS


def position_axes() -> tuple[Any, Any]:
    """A new (figure, axes) for perplexity against the position after the augmentation point."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.0), dpi=110)


def save_position_plot(fig: Any, ax: Any, path: str | Path, title: str, *,
                       xlabel: str = "position after the augmentation point",
                       ylabel: str = "held-out perplexity") -> Path:
    """Label, save to ``path`` (parents created) and close the figure; returns the path."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_controls(table: dict[str, Any], path: str | Path, *, title: str = "") -> Path:
    """PNG: perplexity per position for every method (Agg backend)."""
    from cacheaug_engine.eval.plots import position_axes, save_position_plot

    pos = [p for p in table["positions"] if isinstance(p, int)]
    fig, ax = position_axes()
    style = {"decoder": "k--o", "pause": "-s", "coprocessor": "-o", "shuffled": ":^", "mean": ":v"}
    for m in METHODS:
        if m in table["ppl"]:
            ax.plot(pos, table["ppl"][m][: len(pos)], style[m], label=m)
    return save_position_plot(
        fig, ax, path, title or f"coprocessor vs controls (cache dependence {table['cache_dependence']:.3f})"
    )


def plot_task(res: dict[str, Any], path: str | Path, *, title: str = "") -> Path:
    """PNG of a task evaluation (``eval.task_eval.evaluate_task``): answer perplexity per answer position
    for every method, and exact match with its 95% interval in the legend."""
    fig, ax = position_axes()
    style = {"decoder": "k--o", "pause": "-s", "coprocessor": "-o", "shuffled": ":^", "mean": ":v"}
    for m, v in res["methods"].items():
        ppl = v["ppl_by_position"]
        lo, hi = v["exact_match_ci"]
        ax.plot(range(1, len(ppl) + 1), ppl, style.get(m, "-"),
                label=f"{m} (exact {100 * v['exact_match']:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}])")
    ax.set_yscale("log")
    return save_position_plot(fig, ax, path, title or "held-out problems: answer perplexity by answer token",
                              xlabel="answer token (1 = the first digit; the last is the newline)",
                              ylabel="answer perplexity")

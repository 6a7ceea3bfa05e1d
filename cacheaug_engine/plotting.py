"""The per-position perplexity figure shared by `cacheaug eval` and the controls report (Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def position_axes() -> tuple[Any, Any]:
    """A new (figure, axes) for perplexity against the position after the augmentation point."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.0), dpi=110)


def save_position_plot(fig: Any, ax: Any, path: str | Path, title: str) -> Path:
    """Label, save to ``path`` (parents created) and close the figure; returns the path."""
    import matplotlib.pyplot as plt

    ax.set_xlabel("position after the augmentation point")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path

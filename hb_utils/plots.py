"""Saving figures, and the loss curve that 03 draws and ``hb compare`` reuses.

Why here and not in the notebooks: a figure built in a notebook cell cannot be tested and drifts
between notebooks; these functions take plain frames/dicts, return the figure, and save it so the
HTML report and ``hb compare`` can reuse the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from hb_utils.results import loss_points


def save(fig: plt.Figure, path: Path | None) -> plt.Figure:
    """Save a figure as PNG (creating the folder) and return it for inline display."""
    fig.tight_layout()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig


def loss_curve(log_history: list[dict[str, Any]], path: Path | None = None) -> Any:
    """Training and validation loss against the optimizer step; saved as PNG when ``path`` is given."""
    train, val = loss_points(log_history)
    fig, ax = plt.subplots(figsize=(7.5, 4))
    if train:
        ax.plot(*zip(*train, strict=True), marker="o", ms=3, label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), marker="s", ms=4, label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / supervised token)")
    ax.set_title("Training and validation loss")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    return save(fig, path)


def close(fig: plt.Figure) -> None:
    """Free a figure the notebook does not show (headless writers)."""
    plt.close(fig)

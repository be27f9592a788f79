"""Figures for people: labelled image grids (contact sheets) written atomically as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from derestainer.core.io import atomic_path


def title_fontsize(labels: Sequence[str], cell_inches: float) -> float:
    """Font size (points) of column titles: 8 pt, shrunk down to 5 pt so that the longest label fits a
    cell ``cell_inches`` wide (at about 0.6 em per character of the default sans-serif font)."""
    longest = max((len(label) for label in labels), default=1)
    return min(8.0, max(5.0, cell_inches * 72 / (0.6 * longest)))


def image_grid(
    rows: Sequence[Sequence[np.ndarray]],
    path: str | Path,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
    cell_inches: float = 1.6,
    dpi: int = 110,
) -> Path:
    """Write a grid of ``uint8 [H, W, 3]`` images (``rows[r][c]``) with row and column labels.

    Rows may have different lengths; empty cells stay blank.
    """
    import matplotlib  # here, not at the top: slow to import, and only needed when a figure is written

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = len(rows)
    n_cols = max((len(r) for r in rows), default=0)
    if n_rows == 0 or n_cols == 0:
        raise ValueError("image_grid needs at least one image")
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(cell_inches * n_cols + 0.6, cell_inches * n_rows + (0.5 if title else 0.2)),
        dpi=dpi, squeeze=False,
    )
    col_fs = title_fontsize(col_labels or (), cell_inches)
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(rows[r]) and rows[r][c] is not None:
                ax.imshow(rows[r][c])
            if r == 0 and col_labels is not None and c < len(col_labels):
                ax.set_title(col_labels[c], fontsize=col_fs)
            if c == 0 and row_labels is not None and r < len(row_labels):
                ax.set_ylabel(row_labels[r], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)

"""Figures: column titles fit their cells."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import pytest
from matplotlib.textpath import TextPath

from derestainer.viz import title_fontsize

NAMES = ["H&E", "derestainer", "no_stain", "h_simsiam", "pix2pix", "pyramidpix2pix", "pix2pixhd", "bcistainer", "ground truth"]


def _width_pt(text: str, size: float) -> float:
    """Rendered width of ``text`` in points, on the glyph outlines of matplotlib's default font (the figures')."""
    ext = TextPath((0, 0), text, size=size).get_extents()
    return float(ext.width)


@pytest.mark.parametrize("cell_inches", [0.85, 1.0, 1.6])
def test_the_longest_title_fits_its_cell(cell_inches: float) -> None:
    size = title_fontsize(NAMES, cell_inches)
    assert 5.0 <= size <= 8.0
    assert max(_width_pt(n, size) for n in NAMES) <= cell_inches * 72


def test_short_titles_keep_eight_points_and_tiny_cells_stop_at_five() -> None:
    assert title_fontsize(["H&E", "ground truth"], 1.6) == 8.0
    assert title_fontsize(["pyramidpix2pix"], 0.85) < 8.0
    assert title_fontsize(["a" * 80], 0.5) == 5.0

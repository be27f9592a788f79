"""The resolution plan of a slide: which pyramid level to read and how to resample it to the model's µm/px.

The model was trained at ``mpp_model`` µm/px. With the slide's ``mpp_slide`` (``--mpp`` if given,
else the slide's metadata; an error if neither), one model pixel covers ``scale = mpp_model /
mpp_slide`` level-0 pixels. The pyramid level with the largest downsample ≤ ``scale`` is read and
resampled (Lanczos, exact sub-pixel boxes) by the rest. The output has ``round(W0 / scale) ×
round(H0 / scale)`` pixels at ``mpp_model`` µm/px.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from derestainer.core.errors import SlideError
from derestainer.inference.slides import SlideReader
from derestainer.inference.tiling import TileGrid
from derestainer.inference.tissue import tile_tissue_fraction, tissue_mask


@dataclass(frozen=True)
class SlidePlan:
    """How a slide maps to the model's resolution.

    Attributes:
        slide_mpp, mpp_source: level-0 µm/px and where it came from.
        model_mpp: the model's training µm/px (= the output's µm/px).
        scale: level-0 pixels per model pixel (``model_mpp / slide_mpp``).
        level, level_downsample: the pyramid level read; ``scale / level_downsample`` is resampled.
        height, width: output (model-resolution) size.
        grid: the tile grid over the output.
    """

    slide_mpp: float
    mpp_source: str
    model_mpp: float
    scale: float
    level: int
    level_downsample: float
    height: int
    width: int
    grid: TileGrid

    @property
    def resample(self) -> float:
        """Level pixels per model pixel (1 = no resampling)."""
        return self.scale / self.level_downsample


def plan_slide(
    reader: SlideReader,
    model_mpp: float,
    *,
    tile: int,
    overlap: int,
    margin: int = -1,
    slide_mpp: float | None = None,
) -> SlidePlan:
    """Pick the level and output size for running a model trained at ``model_mpp`` on ``reader``.

    Raises:
        SlideError: the slide's µm/px is unknown and ``slide_mpp`` was not given.
    """
    if slide_mpp is not None and slide_mpp > 0:
        mpp, src = float(slide_mpp), "--mpp"
    elif reader.mpp:
        mpp, src = float(reader.mpp), reader.mpp_source
    else:
        raise SlideError(
            f"{reader.path}: the slide does not state its resolution (microns per pixel); "
            f"pass it with --slide-mpp (e.g. --slide-mpp 0.25 for a 40× scan, 0.5 for 20×)"
        )
    scale = model_mpp / mpp
    level = 0
    for k, ds in enumerate(reader.level_downsamples):
        if ds <= scale * (1 + 1e-3) and ds >= reader.level_downsamples[level]:
            level = k
    w0, h0 = reader.dimensions
    width, height = max(1, round(w0 / scale)), max(1, round(h0 / scale))
    grid = TileGrid(height, width, tile, overlap, margin)
    return SlidePlan(mpp, src, float(model_mpp), scale, level, reader.level_downsamples[level], height, width, grid)


def read_model_region(reader: SlideReader, plan: SlidePlan, y0: int, x0: int, h: int, w: int,
                      normalizer: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """The slide region ``[y0, y0+h) × [x0, x0+w)`` in output (model-resolution) pixels, ``uint8 [h, w, 3]``.

    Resampled from ``plan.level`` with Lanczos over the exact (fractional) source box, so that
    overlapping tiles see identical pixels where they overlap; then, with ``normalizer`` (a pixel-wise
    uint8 → uint8 map, :mod:`.normalize`), stain-normalised, which keeps them identical.
    """
    region = _read_model_region(reader, plan, y0, x0, h, w)
    return region if normalizer is None else normalizer(region)


def _read_model_region(reader: SlideReader, plan: SlidePlan, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    r = plan.resample
    if abs(r - 1.0) < 1e-9:
        return reader.read_level(plan.level, x0, y0, w, h)
    sx0, sy0, sx1, sy1 = x0 * r, y0 * r, (x0 + w) * r, (y0 + h) * r
    pad = math.ceil(3 * max(r, 1.0)) + 1  # Lanczos-3 support in source pixels
    ix0, iy0 = math.floor(sx0) - pad, math.floor(sy0) - pad
    ix1, iy1 = math.ceil(sx1) + pad, math.ceil(sy1) + pad
    region = reader.read_level(plan.level, ix0, iy0, ix1 - ix0, iy1 - iy0)
    img = Image.fromarray(region).resize(
        (w, h), Image.Resampling.LANCZOS, box=(sx0 - ix0, sy0 - iy0, sx1 - ix0, sy1 - iy0))
    return np.asarray(img)


@dataclass(frozen=True)
class TileSelection:
    """Which tiles of a plan's grid to run, from a tissue mask on a thumbnail.

    Attributes:
        thumb: the slide's thumbnail ``uint8 [h, w, 3]``; thumb_mpp: its µm/px.
        mask: tissue mask of the thumbnail (bool ``[h, w]``).
        frac: tissue fraction per tile ``[n_rows, n_cols]``; run: tiles to run (bool, same shape).
        ink_pixels: thumbnail pixels that pen-ink rejection took out of the mask (ink that would
            otherwise pass as tissue, and glass it encloses that would be filled in); 0 without it.
    """

    thumb: np.ndarray
    thumb_mpp: float
    mask: np.ndarray
    frac: np.ndarray
    run: np.ndarray
    ink_pixels: int = 0


def select_tiles(reader: SlideReader, plan: SlidePlan, *, thumbnail_side: int = 1024, all_tiles: bool = False,
                 min_tissue: float = 0.0, reject_ink: bool = True) -> TileSelection:
    """Tissue mask on a thumbnail (:mod:`.tissue`; pen ink rejected unless ``reject_ink`` is false) and the
    tiles with more than ``min_tissue`` tissue (all with ``all_tiles``)."""
    grid = plan.grid
    thumb = reader.thumbnail(thumbnail_side)
    thumb_mpp = plan.slide_mpp * reader.dimensions[0] / thumb.shape[1]
    mask = tissue_mask(thumb, thumb_mpp, reject_ink=reject_ink)
    ink_pixels = int((tissue_mask(thumb, thumb_mpp, reject_ink=False) & ~mask).sum()) if reject_ink else 0
    boxes = np.array([grid.box(i, j) for i in range(grid.n_rows) for j in range(grid.n_cols)], dtype=np.int64)
    frac = tile_tissue_fraction(mask, boxes, thumb.shape[1] / plan.width).reshape(grid.n_rows, grid.n_cols)
    run = np.ones_like(frac, dtype=bool) if all_tiles else frac > min_tissue
    return TileSelection(thumb, thumb_mpp, mask, frac, run, ink_pixels)


__all__ = ["SlidePlan", "TileSelection", "plan_slide", "read_model_region", "select_tiles"]

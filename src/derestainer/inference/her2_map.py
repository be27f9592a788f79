"""The whole-slide HER2 map as data: level-0 tile boxes, QuPath GeoJSON, a registered probability OME-TIFF.

Coordinates. The model runs at ``model_mpp`` µm/px; one model pixel covers ``plan.scale = model_mpp /
slide_mpp`` level-0 pixels along each axis, whatever pyramid level was read (the level and its
resampling only decide how those pixels are produced, :func:`~.plan.read_model_region`). So tile
``(i, j)``, model box ``[xs[j], xs[j] + tile) × [ys[i], ys[i] + tile)`` cut at the output's edge, is
the level-0 box ``scale ×`` that, cut at the slide's edge: :func:`tile_box_level0`.

Outputs (beside the virtual-IHC TIFF, tissue tiles only, i.e. the tiles the model ran on):

- ``NAME.her2.geojson``: a GeoJSON FeatureCollection (RFC 7946 shapes in plain level-0 pixel
  coordinates, as QuPath reads them; closed rings whose signed area is positive, i.e. counter-clockwise
  in the (x, y) plane the numbers describe) of QuPath ``tile`` objects with a HER2 classification and
  flat ``measurements`` (QuPath ≥ 0.4): ``p(0)`` … ``p(3+)``, ``expected level``, ``tissue fraction``,
  ``tile row``, ``tile col``.
- ``NAME.her2.ome.tiff``: float32 ``CYX`` with one channel per level probability and one for the
  expected level, NaN where no tile ran, on a regular grid of ``step`` model pixels (the tile stride
  by default), each cell the value of the tile whose centre is nearest (the heat map's rule); its
  ``PhysicalSizeX/Y`` is ``model_mpp × step`` µm = level-0 µm/px × ``scale × step``, so viewers
  overlay it on the slide at the right scale. A finer ``step`` only resamples the per-tile values: the
  model gives one probability vector per tile.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from derestainer.core.io import atomic_path, write_text
from derestainer.inference.plan import SlidePlan
from derestainer.inference.provenance import map_provenance, ome_xml, software

#: Level probabilities per tile (``[row][col]``), None where no tile ran (``slide_outputs.ProbsGrid``).
Probs = Sequence[Sequence[Sequence[float] | None]]
#: Heat-map colour range: the slide's own expected-level range, or the fixed 0 … (levels − 1).
HeatmapScale = Literal["data", "fixed"]

#: QuPath classification colours (r, g, b) by level index: blue, yellow, orange, red.
LEVEL_COLOURS = ((70, 110, 200), (240, 200, 40), (240, 130, 20), (200, 20, 20))
DISCLAIMER = "virtual stain — not a real IHC"


def tile_box_level0(plan: SlidePlan, i: int, j: int,
                    slide_size: tuple[int, int] | None = None) -> tuple[float, float, float, float]:
    """``(x0, y0, width0, height0)`` of tile ``(i, j)`` in level-0 pixels (see the module docstring).

    ``slide_size``: level-0 ``(width, height)``, where the box is cut (the output's edge, in level-0
    pixels, may pass it by less than a model pixel, from rounding the output's size).
    """
    g, s = plan.grid, plan.scale
    x0, y0 = float(g.xs[j]) * s, float(g.ys[i]) * s
    x1, y1 = min(int(g.xs[j]) + g.tile, plan.width) * s, min(int(g.ys[i]) + g.tile, plan.height) * s
    if slide_size is not None:
        x1, y1 = min(x1, float(slide_size[0])), min(y1, float(slide_size[1]))
    return x0, y0, x1 - x0, y1 - y0


def expected_level(p: Sequence[float]) -> float:
    """``Σ k · p_k``: the expected HER2 level of one tile."""
    return float(np.dot(np.asarray(p, dtype=np.float64), np.arange(len(p))))


def level_colour(k: int) -> list[int]:
    """QuPath colour ``[r, g, b]`` of level ``k``."""
    return list(LEVEL_COLOURS[min(k, len(LEVEL_COLOURS) - 1)])


def _ring(x: float, y: float, w: float, h: float) -> list[list[float]]:
    """Closed rectangle ring, positive signed area (counter-clockwise in the (x, y) plane, RFC 7946)."""
    x0, y0, x1, y1 = round(x, 3), round(y, 3), round(x + w, 3), round(y + h, 3)
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def tile_features(plan: SlidePlan, frac: np.ndarray, probs_grid: Probs, names: Sequence[str],
                  slide_size: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """One QuPath ``tile`` Feature per tile with probabilities, row-major (format: module docstring)."""
    feats: list[dict[str, Any]] = []
    for i, row in enumerate(probs_grid):
        for j, p in enumerate(row):
            if p is None:
                continue
            k = int(np.argmax(p))
            measurements = {f"p({n})": round(float(v), 6) for n, v in zip(names, p)}
            measurements.update({"expected level": round(expected_level(p), 6),
                                 "tissue fraction": round(float(frac[i, j]), 4), "tile row": i, "tile col": j})
            feats.append({
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [_ring(*tile_box_level0(plan, i, j, slide_size))]},
                "properties": {"objectType": "tile",
                               "classification": {"name": f"HER2 {names[k]}", "color": level_colour(k)},
                               "measurements": measurements},
            })
    return feats


def write_geojson(path: Path, plan: SlidePlan, frac: np.ndarray, probs_grid: Probs, names: Sequence[str],
                  slide_size: tuple[int, int] | None = None) -> int:
    """Write ``NAME.her2.geojson`` atomically (compact JSON, no NaN); return the number of tiles in it."""
    feats = tile_features(plan, frac, probs_grid, names, slide_size)
    text = json.dumps({"type": "FeatureCollection", "features": feats}, separators=(",", ":"), allow_nan=False)
    write_text(path, text + "\n")
    return len(feats)


def map_step(plan: SlidePlan, step: int | None = None) -> int:
    """The probability map's cell side in model pixels: ``step``, or the tile stride by default."""
    s = plan.grid.tile - plan.grid.overlap if step is None else int(step)
    if s < 1:
        raise ValueError(f"the probability map's step must be ≥ 1 model pixel, got {s}")
    return s


def nearest_tile(coords: np.ndarray, starts: np.ndarray, tile: int, length: int) -> np.ndarray:
    """Index of the tile (starts ``starts``, side ``tile``, cut at ``length``) whose centre is nearest
    each coordinate; ties go to the earlier tile."""
    centres = (starts + np.minimum(starts + tile, length)) / 2.0
    return np.searchsorted((centres[1:] + centres[:-1]) / 2.0, coords, side="left")


def probability_raster(plan: SlidePlan, probs_grid: Probs, step: int | None = None) -> np.ndarray:
    """float32 ``[K + 1, ceil(H / step), ceil(W / step)]``: level probabilities then expected level per
    cell of ``step`` model pixels (NaN where no tile ran); cell → tile of the nearest centre."""
    g, s = plan.grid, map_step(plan, step)
    k = next((len(p) for row in probs_grid for p in row if p is not None), 0)
    per_tile = np.full((g.n_rows, g.n_cols, k + 1), np.nan, dtype=np.float32)
    for i, row in enumerate(probs_grid):
        for j, p in enumerate(row):
            if p is not None:
                per_tile[i, j, :k] = p
                per_tile[i, j, k] = expected_level(p)
    ny, nx = math.ceil(plan.height / s), math.ceil(plan.width / s)
    cy = (np.arange(ny) * s + np.minimum(np.arange(1, ny + 1) * s, plan.height)) / 2.0  # in-image cell centres
    cx = (np.arange(nx) * s + np.minimum(np.arange(1, nx + 1) * s, plan.width)) / 2.0
    iy = nearest_tile(cy, g.ys, g.tile, plan.height)
    ix = nearest_tile(cx, g.xs, g.tile, plan.width)
    return np.ascontiguousarray(per_tile[iy[:, None], ix[None, :]].transpose(2, 0, 1))


def map_channel_names(names: Sequence[str]) -> list[str]:
    """Channel names of the probability map: ``p(0)`` … ``p(3+)``, ``expected level``."""
    return [f"p({n})" for n in names] + ["expected level"]


def write_probability_map(path: Path, plan: SlidePlan, probs_grid: Probs, names: Sequence[str], *,
                          step: int | None = None, name: str = "",
                          provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``NAME.her2.ome.tiff`` atomically (format: module docstring), its OME-XML by
    :func:`~.provenance.ome_xml` with ``provenance`` (the slide's record, :func:`~.provenance.map_provenance`);
    return its shape, step and µm/px."""
    import tifffile  # optional (the wsi extra)

    s = map_step(plan, step)
    data = probability_raster(plan, probs_grid, s)
    um = plan.model_mpp * s
    prov = map_provenance(provenance, um) if provenance else None
    xml = ome_xml(name or "HER2 probability map", data.shape[2], data.shape[1], um, prov,
                  channels=map_channel_names(names))
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp) as tif:  # the temporary name ends in .tiff only
        for c, plane in enumerate(data):  # one page per channel, the first carrying the OME-XML
            tif.write(plane, photometric="minisblack", compression="zlib", metadata=None, software=software(),
                      resolution=(1e4 / um, 1e4 / um), resolutionunit="CENTIMETER", description=xml if c == 0 else None)
    return {"shape": list(data.shape), "step_model_px": s, "mpp": um}


def heatmap_range(values: np.ndarray, n_levels: int, scale: HeatmapScale = "data",
                  min_span: float = 0.1) -> tuple[float, float]:
    """Colour range of the heat map: the finite values' min–max (widened to ``min_span`` and kept
    inside ``[0, n_levels − 1]``), or the fixed ``[0, n_levels − 1]``."""
    top = float(n_levels - 1)
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if scale == "fixed" or v.size == 0:
        return 0.0, top
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < min_span:
        mid = (lo + hi) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
        if lo < 0:
            lo, hi = 0.0, min(top, hi - lo)
        elif hi > top:
            lo, hi = max(0.0, lo - (hi - top)), top
    return lo, hi


def colourbar_ticks(vmin: float, vmax: float, names: Sequence[str]) -> tuple[list[float], list[str]]:
    """Colour-bar ticks in HER2 levels: both ends (their value, or the level's name when whole) and the
    whole levels between them (by name; those closer than 8 % of the range to an end are left out)."""
    def label(v: float) -> str:
        k = round(v)
        return names[k] if abs(v - k) < 1e-6 and 0 <= k < len(names) else f"{v:.2f}"

    gap = 0.08 * (vmax - vmin)
    inner = [float(k) for k in range(math.ceil(vmin), math.floor(vmax) + 1)
             if vmin + gap < k < vmax - gap and k < len(names)]
    ticks = [vmin, *inner, vmax]
    return ticks, [label(v) for v in ticks]


def heatmap_title(title: str, call: str | None) -> str:
    """The heat map's title: the slide, its slide-level call and the virtual-stain warning."""
    first = " — ".join(t for t in (title, f"slide-level call: HER2 {call}" if call else "") if t)
    return f"{first}\n{DISCLAIMER}" if first else DISCLAIMER


__all__ = ["DISCLAIMER", "LEVEL_COLOURS", "HeatmapScale", "Probs", "colourbar_ticks", "expected_level",
           "heatmap_range", "heatmap_title", "level_colour", "map_channel_names", "map_step", "nearest_tile",
           "probability_raster", "tile_box_level0", "tile_features", "write_geojson", "write_probability_map"]

"""What one translated slide leaves beside its TIFF: paths, slide-level HER2 rule, summary JSON, tile CSV, heat map."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from derestainer.core.io import write_bytes, write_json, write_text
from derestainer.inference.geometry import output_geometry
from derestainer.inference.her2_map import (
    HeatmapScale,
    colourbar_ticks,
    expected_level,
    heatmap_range,
    heatmap_title,
    nearest_tile,
    tile_box_level0,
    write_geojson,
    write_probability_map,
)
from derestainer.inference.plan import SlidePlan, TileSelection
from derestainer.inference.slide_options import SlideOptions

#: Level probabilities per tile (``[row][col]``), None where the tile was not run.
ProbsGrid = list[list[list[float] | None]]


@dataclass(frozen=True)
class SlideOutputs:
    """Paths written for one slide: the TIFF and its side files, plus the work folder."""

    tiff: Path
    heatmap: Path
    tiles_csv: Path
    summary: Path
    work: Path
    geojson: Path  # NAME.her2.geojson: tissue tiles for QuPath (level-0 pixels)
    her2_map: Path  # NAME.her2.ome.tiff: level probabilities on the tile-stride grid, registered to the slide

    def files(self) -> tuple[Path, ...]:
        """Every path written for the slide (the work folder included)."""
        return self.tiff, self.heatmap, self.tiles_csv, self.summary, self.work, self.geojson, self.her2_map

    @property
    def lock(self) -> Path:
        """The one lock file of the slide's outputs, named by their common stem (``a.tif`` and
        ``a.ome.tiff`` share side files, and so share it)."""
        return self.work.with_name(self.work.name[: -len(".work")] + ".lock")

    @classmethod
    def for_tiff(cls, tiff: str | os.PathLike[str]) -> SlideOutputs:
        t = Path(tiff)
        stem = strip_tiff_suffixes(t.name)
        d = t.parent
        return cls(t, d / f"{stem}.heatmap.png", d / f"{stem}.tiles.csv", d / f"{stem}.summary.json",
                   d / f".{stem}.work", d / f"{stem}.her2.geojson", d / f"{stem}.her2.ome.tiff")


def strip_tiff_suffixes(name: str) -> str:
    """The file name without its (OME-)TIFF suffix (or its last suffix): ``a.ome.tiff`` → ``a``."""
    low = name.lower()
    for sfx in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if low.endswith(sfx):
            return name[: -len(sfx)]
    return Path(name).stem


def slide_level(level_fractions: Sequence[float] | np.ndarray, threshold: float = 0.10) -> int:
    """Slide-level HER2 class from the fractions of tissue tiles whose most probable class is k.

    The highest k such that more than ``threshold`` of the tissue tiles are classed k or higher
    (after the ASCO/CAP wording "in more than 10 % of tumour cells"); 0 when none is.
    """
    f = np.asarray(level_fractions, dtype=np.float64)
    at_least = np.cumsum(f[::-1])[::-1]  # fraction classed ≥ k
    ks = np.nonzero(at_least > threshold)[0]
    return int(ks.max()) if len(ks) else 0


@dataclass(frozen=True)
class SlideResult:
    """Everything the side files of one translated slide are made from.

    Attributes:
        slide: the slide file; outs: the paths written; reader: reader/format name;
        slide_size: level-0 ``(width, height)``; model: model file; device: where it ran;
        level_names: HER2 class names; plan, options, selection: how it was run;
        probs_grid: level probabilities per tile; pyramid: what :func:`~.ometiff.write_pyramid` returned;
        resumed: finished bands came from a work folder; computed_tiles, model_seconds: tiles run in this
        session and the time spent on them; seconds: the whole call.
    """

    slide: Path
    outs: SlideOutputs
    reader: str
    slide_size: tuple[int, int]
    model: Path
    device: str
    level_names: tuple[str, ...]
    plan: SlidePlan
    options: SlideOptions
    selection: TileSelection
    probs_grid: ProbsGrid
    pyramid: dict[str, Any]
    resumed: bool
    computed_tiles: int
    model_seconds: float
    seconds: float


def write_slide_outputs(r: SlideResult) -> dict[str, Any]:
    """Write the tile CSV; for models with a level head the heat map, GeoJSON and probability map
    (:mod:`.her2_map`); then the summary JSON; return the summary."""
    summary = summarise(r)
    sel, outs, names = r.selection, r.outs, r.level_names
    write_tiles_csv(outs.tiles_csv, r.plan, sel.frac, sel.run, r.probs_grid, names, slide_size=r.slide_size)
    if summary["level_predictions"]:
        write_heatmap(outs.heatmap, sel.thumb, sel.mask, r.plan, r.probs_grid, names, title=r.slide.name,
                      call=summary["predicted_level"])
        write_geojson(outs.geojson, r.plan, sel.frac, r.probs_grid, names, slide_size=r.slide_size)
        write_probability_map(outs.her2_map, r.plan, r.probs_grid, names, name=f"HER2 probabilities of {r.slide.name}",
                              step=r.options.map_step(r.plan.model_mpp), provenance=r.pyramid.get("provenance"))
    else:  # a model without a level head: none of these, and none of an earlier run left beside the new TIFF
        for p in (outs.heatmap, outs.geojson, outs.her2_map):
            p.unlink(missing_ok=True)
    write_json(outs.summary, summary)  # last: the record that the slide's outputs are complete
    return summary


def summarise(r: SlideResult) -> dict[str, Any]:
    """The summary of one slide (``NAME.summary.json``; fields in docs/inference.md)."""
    names, plan, o, grid = r.level_names, r.plan, r.options, r.plan.grid
    run, mask = r.selection.run, r.selection.mask
    tissue_probs = [p for row in r.probs_grid for p in row if p is not None]
    has_head = bool(tissue_probs)
    mean = np.mean(tissue_probs, axis=0) if has_head else None
    fractions = (np.bincount(np.argmax(tissue_probs, axis=1), minlength=len(names)) / len(tissue_probs)
                 if has_head else None)
    level = slide_level(fractions, o.level_threshold) if fractions is not None else None
    out_w, out_h, out_mpp = output_geometry(plan, r.slide_size, o.geometry)
    return {
        "slide": str(r.slide),
        "output": str(r.outs.tiff),
        "reader": r.reader,
        "slide_size": list(r.slide_size),
        "slide_mpp": plan.slide_mpp,
        "mpp_source": plan.mpp_source,
        "model": str(r.model),
        "model_mpp": plan.model_mpp,
        "level_read": plan.level,
        "level_downsample": plan.level_downsample,
        "resample_factor": plan.resample,
        "geometry": o.geometry,
        "output_size": [out_w, out_h],
        "output_mpp": out_mpp,
        "model_size": [plan.width, plan.height],
        "pyramid": {k: v for k, v in r.pyramid.items() if k != "provenance"},
        # what the TIFF itself records of how it was made (.provenance): the same record, here too
        "provenance": r.pyramid.get("provenance"),
        "tile": o.tile, "overlap": o.overlap, "margin": grid.margin,
        "tiles": {"total": len(grid), "run": int(run.sum()), "skipped": int(len(grid) - run.sum()),
                  "computed_this_session": r.computed_tiles},
        "tissue_area_mm2": float(mask.sum() * r.selection.thumb_mpp**2 / 1e6),
        "tissue_fraction": float(mask.mean()),
        "ink_pixels": r.selection.ink_pixels,  # thumbnail pixels of pen ink taken out of the tissue mask
        "level_predictions": has_head,
        "levels": list(names),
        "mean_probabilities": None if mean is None else {n: float(v) for n, v in zip(names, mean)},
        "level_fractions": None if fractions is None else {n: float(v) for n, v in zip(names, fractions)},
        "predicted_level": None if level is None else names[level],
        "level_rule": (f"highest level k such that more than {o.level_threshold:.0%} of tissue tiles have "
                       f"their most probable level ≥ k (0 otherwise)"),
        "warnings": ([(f"the slide ({plan.slide_mpp:g} µm/px) is coarser than the model's training resolution "
                       f"({plan.model_mpp:g} µm/px): it was upsampled {1 / plan.scale:.2f}×")]
                     if plan.scale < 1 / 1.5 else []),
        "resumed": r.resumed,
        "device": r.device,
        "seconds": r.seconds,
        "model_seconds": r.model_seconds,
        "tiles_per_second": (r.computed_tiles / r.model_seconds) if r.model_seconds > 0 else None,
    }


def write_tiles_csv(path: Path, plan: SlidePlan, frac: np.ndarray, run: np.ndarray,
                    probs_grid: ProbsGrid, names: Sequence[str], slide_size: tuple[int, int] | None = None) -> None:
    """Per-tile CSV: level-0 box, model-pixel position, tissue fraction, whether it ran, most probable and
    expected level, probabilities.

    ``x0, y0, width0, height0``: the tile in the slide's level-0 pixels (:func:`~.her2_map.tile_box_level0`,
    cut at ``slide_size``); ``x_model, y_model, size_model``: in the output's (model-resolution) pixels.
    (Before: ``y, x, size`` in model pixels; renamed so that a reader of the old columns fails, not misreads.)
    """
    grid = plan.grid
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(["row", "col", "x0", "y0", "width0", "height0", "x_model", "y_model", "size_model",
                 "tissue_fraction", "run", "level", "expected_level"] + [f"p_{n}" for n in names])
    for i in range(grid.n_rows):
        for j in range(grid.n_cols):
            p = probs_grid[i][j]
            extra = ([names[int(np.argmax(p))], f"{expected_level(p):.4f}"]
                     + [f"{v:.6f}" for v in p]) if p is not None else [""] * (2 + len(names))
            box0 = [_coord(v) for v in tile_box_level0(plan, i, j, slide_size)]
            wr.writerow([i, j, *box0, int(grid.xs[j]), int(grid.ys[i]), grid.tile, f"{frac[i, j]:.4f}",
                         int(run[i, j])] + extra)
    write_text(path, buf.getvalue())


def _coord(v: float) -> str:
    """A level-0 coordinate for the CSV: 3 decimals at most, none when whole (``96``, ``47.5``)."""
    return f"{v:.3f}".rstrip("0").rstrip(".")


def heatmap_grid(probs_grid: ProbsGrid) -> np.ndarray:
    """Expected HER2 level ``Σ k·p_k`` per tile, NaN where the tile was not run: float ``[n_rows, n_cols]``."""
    out = np.full((len(probs_grid), len(probs_grid[0]) if probs_grid else 0), np.nan)
    for i, row in enumerate(probs_grid):
        for j, p in enumerate(row):
            if p is not None:
                out[i, j] = expected_level(p)
    return out


def write_heatmap(path: Path, thumb: np.ndarray, mask: np.ndarray, plan: SlidePlan, probs_grid: ProbsGrid,
                  names: Sequence[str], title: str = "", call: str | None = None,
                  scale: HeatmapScale = "data") -> None:
    """H&E thumbnail beside the expected-level heat map (nearest tile centre per pixel, tissue only).

    Colours span the expected levels shown (``scale="data"``, :func:`~.her2_map.heatmap_range`) or the
    fixed 0 … 3 (``"fixed"``); the title names the slide, its slide-level ``call`` and that the stain is
    virtual (:func:`~.her2_map.heatmap_title`).
    """
    # Imported here: matplotlib costs ~0.5 s to import and only the heat map needs it. An Agg canvas of
    # its own, no pyplot, so the user's backend (e.g. Jupyter's) is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = plan.grid
    values = heatmap_grid(probs_grid)
    # Plot at ≤ 512 px: matplotlib's image resampling allocates several float copies of what it draws.
    f = max(thumb.shape[:2]) / 512
    if f > 1:
        size = (max(1, round(thumb.shape[1] / f)), max(1, round(thumb.shape[0] / f)))
        thumb = np.asarray(Image.fromarray(thumb).resize(size, Image.Resampling.BOX))
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.BOX)) >= 128
    th, tw = thumb.shape[:2]
    # Thumbnail pixel → nearest tile centre along each axis (output coordinates).
    cy = (np.arange(th) + 0.5) * plan.height / th
    cx = (np.arange(tw) + 0.5) * plan.width / tw
    iy = nearest_tile(cy, grid.ys, grid.tile, plan.height)
    ix = nearest_tile(cx, grid.xs, grid.tile, plan.width)
    heat = values[iy[:, None], ix[None, :]]
    heat[~mask] = np.nan
    vmin, vmax = heatmap_range(heat, len(names), scale)
    gray = thumb.mean(axis=-1) / 255.0
    fig = Figure(figsize=(10, min(5.0 * th / max(tw, 1), 12.0) + 0.8), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    axes[0].imshow(thumb, interpolation="nearest")
    axes[0].set_title("H&E")
    axes[1].imshow(gray, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    im = axes[1].imshow(np.ma.masked_invalid(heat), cmap="YlOrBr", vmin=vmin, vmax=vmax, alpha=0.85,
                        interpolation="nearest")
    axes[1].set_title("virtual HER2 level (expected, per tile)")
    for ax in axes:
        ax.set_axis_off()
    ticks, labels = colourbar_ticks(vmin, vmax, names)
    cb = fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.02, ticks=ticks)
    cb.ax.set_yticklabels(labels)
    cb.set_label("expected HER2 level" + (" (this slide's range)" if scale == "data" else ""))
    fig.suptitle(heatmap_title(title, call))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes(path, buf.getvalue())


__all__ = ["ProbsGrid", "SlideOutputs", "SlideResult", "heatmap_grid", "slide_level", "strip_tiff_suffixes",
           "summarise", "write_heatmap", "write_slide_outputs", "write_tiles_csv"]

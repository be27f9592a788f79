"""Whole-slide inference: read, resample, mask, stream tiles through the model, write a pyramidal OME-TIFF.

Pipeline for one slide (see docs/inference.md):

1. **Read** with OpenSlide (SVS, NDPI, MRXS, generic tiled TIFF, …); TIFFs OpenSlide does not
   take (striped, OME-TIFF) through tifffile; PNG/JPEG through Pillow.
2. **Resolution.** The model was trained at ``mpp_model`` µm/px. With the slide's ``mpp_slide``
   (``--mpp`` if given, else the slide's metadata; an error if neither), one model pixel covers
   ``scale = mpp_model / mpp_slide`` level-0 pixels. The pyramid level with the largest downsample
   ≤ ``scale`` is read and resampled (Lanczos, exact sub-pixel boxes) by the rest. The output has
   ``round(W0 / scale) × round(H0 / scale)`` pixels at ``mpp_model`` µm/px.
3. **Tissue mask** on a thumbnail (:mod:`.tissue`); tiles without tissue are not run and count as white.
4. **Tiles** of ``tile`` px overlapping by ``overlap`` px, blended by the raised-cosine partition of
   unity of :mod:`.tiling`, one row of tiles at a time; each finished row band is saved to a work
   folder (PNG) and streamed into the TIFF writer (:mod:`.ometiff`). Memory: O(tile × width).
5. **Outputs** beside the TIFF: a HER2 heat map PNG, per-tile probabilities CSV, a summary JSON.

Interruptions leave no file at the output path (temporary name, renamed at the end); the work
folder keeps finished bands and ``progress.json`` so that ``resume=True`` skips them.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import csv
import io
import json
import math
import os
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from ..io import atomic_path, write_json, write_text
from .optimize import InferenceModel
from .patches import LoadedModel, predict, resolved_precision, uint8_to_model
from .tiling import BandBlender, TileGrid
from .tissue import tile_tissue_fraction, tissue_mask

if TYPE_CHECKING:
    from typing_extensions import Self

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".btf", ".tf8", ".tf2", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs",
                  ".svslide", ".bif", ".dcm", ".png", ".jpg", ".jpeg")
PROGRESS_FORMAT = 2  # 2: settings in progress.json (written once), one band_NNNNN.json per finished band


class SlideError(ValueError):
    """A slide cannot be read or processed as asked (the message names the file and the fix)."""


# ==================================================================================================
# Readers


class SlideReader:
    """Minimal multi-resolution reader interface (level coordinates; outside the slide is white).

    Attributes:
        path: the slide file.
        level_dimensions: ``(width, height)`` per level, level 0 first.
        level_downsamples: level-0 pixels per level pixel.
        mpp: microns per pixel of level 0, or None if the file does not say.
        mpp_source: where ``mpp`` came from.
        vendor: reader/format name.
    """

    path: Path
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp: float | None = None
    mpp_source: str = ""
    vendor: str = ""

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """``uint8 [h, w, 3]`` from ``level`` at level coordinates ``(x, y)``; white outside the slide."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """Whole slide at most ``max_side`` px on its longer side, ``uint8 [h, w, 3]``.

        Read band by band from the smallest level that is still at least that large, so that the
        memory needed does not depend on the slide's size.
        """
        w0, h0 = self.dimensions
        f0 = max(w0, h0) / max_side
        if f0 <= 1:
            tw, th = w0, h0
        else:
            tw, th = max(1, round(w0 / f0)), max(1, round(h0 / f0))
        level = 0
        for k, (lw, lh) in enumerate(self.level_dimensions):
            if lw >= tw and lh >= th:
                level = k
        lw, lh = self.level_dimensions[level]
        fy = lh / th
        out = np.empty((th, tw, 3), dtype=np.uint8)
        band = max(1, int(512 // max(fy, 1.0)))  # thumbnail rows per read: ≤ ~512 level rows
        for t0 in range(0, th, band):
            t1 = min(th, t0 + band)
            r0, r1 = math.floor(t0 * fy), min(lh, math.ceil(t1 * fy))
            region = self.read_level(level, 0, r0, lw, max(1, r1 - r0))
            img = Image.fromarray(region).resize(
                (tw, t1 - t0), Image.Resampling.BOX, box=(0.0, t0 * fy - r0, float(lw), t1 * fy - r0))
            out[t0:t1] = np.asarray(img)
        return out


def _composite_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA (straight alpha, as OpenSlide returns it) over white → RGB uint8."""
    rgb = rgba[..., :3]
    a = rgba[..., 3]
    if a.min() == 255:
        return np.ascontiguousarray(rgb)
    af = a[..., None].astype(np.float32) / 255.0
    return np.clip(rgb * af + 255.0 * (1.0 - af) + 0.5, 0, 255).astype(np.uint8)


class OpenSlideReader(SlideReader):
    """OpenSlide: SVS, NDPI, MRXS, SCN, VMS, BIF, DICOM, generic tiled TIFF."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import openslide

        self.path = Path(path)
        try:
            self._s = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideError as exc:
            raise SlideError(f"{self.path}: OpenSlide cannot read it ({exc})") from exc
        self.level_dimensions = [tuple(d) for d in self._s.level_dimensions]
        self.level_downsamples = [float(d) for d in self._s.level_downsamples]
        props = self._s.properties
        self.vendor = f"openslide:{props.get('openslide.vendor', 'unknown')}"
        mpp = props.get("openslide.mpp-x")
        if mpp:
            with contextlib.suppress(ValueError):
                if float(mpp) > 0:
                    self.mpp, self.mpp_source = float(mpp), "openslide.mpp-x"

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        img = self._s.read_region((round(x * ds), round(y * ds)), level, (int(w), int(h)))
        return _composite_white(np.asarray(img))

    def close(self) -> None:
        self._s.close()


def _tiff_mpp(tf: Any) -> tuple[float | None, str]:
    """µm/px of a TIFF: Aperio ``MPP =``, OME ``PhysicalSizeX`` (µm), or resolution tags (cm/inch)."""
    page = tf.pages[0]
    desc = page.description or ""
    m = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", desc)
    if m:
        with contextlib.suppress(ValueError):
            return float(m.group(1)), "aperio MPP"
    if getattr(tf, "is_ome", False) and tf.ome_metadata:
        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tf.ome_metadata)
        u = re.search(r'PhysicalSizeXUnit="([^"]+)"', tf.ome_metadata)
        unit = u.group(1) if u else "µm"
        scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit)
        if m and scale:
            return float(m.group(1)) * scale, "OME PhysicalSizeX"
    xres = page.tags.get("XResolution")
    unit = page.tags.get("ResolutionUnit")
    if xres is not None and unit is not None:
        num, den = xres.value
        if num > 0 and den > 0:
            px_per_unit = num / den
            u = int(unit.value)
            if u == 3:  # centimetre
                return 1e4 / px_per_unit, "TIFF resolution (cm)"
            if u == 2:  # inch: 72/96/300 dpi defaults are not microscope resolutions
                mpp = 25400.0 / px_per_unit
                if mpp < 50:
                    return mpp, "TIFF resolution (inch)"
    return None, ""


class TiffReader(SlideReader):
    """tifffile (plus zarr for region reads when installed): striped or tiled TIFF, OME-TIFF, SVS."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import tifffile

        self.path = Path(path)
        try:
            self._tf = tifffile.TiffFile(str(self.path))
            series = self._tf.series[0]
        except Exception as exc:  # tifffile raises many kinds on bad files
            raise SlideError(f"{self.path}: not a readable TIFF ({exc})") from exc
        levels = list(series.levels)
        self._axes = series.axes
        dims = []
        self._layouts: list[tuple[tuple[str, ...], tuple[int, int, int | None]]] = []
        for lv in levels:
            axes, shape = str(lv.axes), tuple(int(n) for n in lv.shape)
            layout = _tiff_layout(axes, shape)
            if layout is None:
                self._tf.close()
                raise SlideError(
                    f"{self.path}: unsupported TIFF layout (axes {axes}, shape {shape}); expected one image "
                    f"plane with Y, X and at most one colour axis (S or C) of 1, 3 or 4 samples")
            self._layouts.append(layout)
            sizes = dict(zip(axes, shape))
            dims.append((sizes["X"], sizes["Y"]))
        self.level_dimensions = dims
        self.level_downsamples = [dims[0][0] / d[0] for d in dims]
        self.vendor = "tifffile"
        self.mpp, self.mpp_source = _tiff_mpp(self._tf)
        self._series = series
        self._levels = levels
        self._arrays: dict[int, Any] = {}

    def _array(self, level: int) -> Any:
        if level not in self._arrays:
            try:
                import zarr

                self._arrays[level] = zarr.open(self._series.aszarr(level=level), mode="r")
            except ImportError:
                warnings.warn(f"{self.path}: zarr is not installed; reading a whole TIFF level into memory", stacklevel=2)
                self._arrays[level] = self._levels[level].asarray()
        return self._arrays[level]

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        lw, lh = self.level_dimensions[level]
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x1 <= x0 or y1 <= y0:
            return out
        kinds, (ay, ax, ac) = self._layouts[level]
        index = tuple(slice(y0, y1) if k == "Y" else slice(x0, x1) if k == "X" else slice(None) if k == "C" else 0
                      for k in kinds)
        arr = np.asarray(self._array(level)[index])
        # Axes left after indexing, in file order → (Y, X[, colour]).
        arr = np.moveaxis(arr, [ay, ax] + ([] if ac is None else [ac]), [0, 1] + ([] if ac is None else [2]))
        out[y0 - y:y1 - y, x0 - x:x1 - x] = _to_rgb8(arr)
        return out

    def close(self) -> None:
        self._tf.close()


def _tiff_layout(axes: str, shape: tuple[int, ...]) -> tuple[tuple[str, ...], tuple[int, int, int | None]] | None:
    """How to read one TIFF level as ``(Y, X[, colour])``, or None when it is not one RGB(A)/grey plane.

    Returns ``(kinds, (y, x, colour))``: per file axis ``"Y"``, ``"X"``, ``"C"`` (the colour axis,
    ``S`` or ``C`` with more than one sample) or ``"0"`` (a length-1 axis, read at index 0); then the
    positions of Y, X and colour among the axes left after that indexing (colour None for grey).
    """
    if len(axes) != len(shape) or axes.count("Y") != 1 or axes.count("X") != 1:
        return None
    kinds: list[str] = []
    for a, n in zip(axes, shape):
        if a in "YX":
            kinds.append(a)
        elif a in "SC" and n > 1:
            if n not in (3, 4) or "C" in kinds:
                return None
            kinds.append("C")
        elif n == 1:
            kinds.append("0")
        else:
            return None  # several planes (Z, T, channels of a fluorescence image, ...)
    kept = [k for k in kinds if k != "0"]
    return tuple(kinds), (kept.index("Y"), kept.index("X"), kept.index("C") if "C" in kept else None)


def _to_rgb8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.uint8:
        hi = 65535.0 if arr.dtype == np.uint16 else max(float(arr.max()), 1.0)
        arr = np.clip(arr.astype(np.float64) / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[-1] == 4:
        return _composite_white(arr)
    if arr.shape[-1] == 1:
        return np.repeat(arr, 3, axis=2)
    return arr


class ImageReader(SlideReader):
    """Pillow, for PNG/JPEG and other flat images (decoded whole: they have no tiles to read lazily)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from ..io import ImageReadError, read_image

        self.path = Path(path)
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # the user asked for this slide: no decompression-bomb guard
        try:
            self._img = read_image(self.path)
        except ImageReadError as exc:
            raise SlideError(str(exc)) from exc
        finally:
            Image.MAX_IMAGE_PIXELS = old
        h, w = self._img.shape[:2]
        self.level_dimensions = [(w, h)]
        self.level_downsamples = [1.0]
        self.vendor = "pillow"

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        from .tiling import extract_tile

        return extract_tile(self._img, (y, x, y + h, x + w), pad_value=255)


def open_slide(path: str | os.PathLike[str]) -> SlideReader:
    """Open a slide with the best reader for it.

    OpenSlide for whatever it recognises (except OME-TIFF, whose SubIFD pyramid it does not see);
    tifffile for other TIFFs (also the fallback for SVS when OpenSlide is not installed); Pillow
    for other images.

    Raises:
        SlideError: missing or unreadable file.
    """
    p = Path(path)
    if not p.is_file():
        raise SlideError(f"{p}: no such slide file")
    name = p.name.lower()
    is_tiff = name.endswith((".tif", ".tiff", ".svs", ".btf", ".tf8", ".tf2"))
    if not name.endswith((".ome.tif", ".ome.tiff")):
        try:
            import openslide

            if openslide.OpenSlide.detect_format(str(p)):
                return OpenSlideReader(p)
        except ImportError:
            pass
    if is_tiff:
        return TiffReader(p)
    if name.endswith((".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide", ".dcm")):
        raise SlideError(f"{p}: this format needs OpenSlide (pip install openslide-python openslide-bin)")
    return ImageReader(p)


# ==================================================================================================
# Resolution plan


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
            f"pass it with --mpp (e.g. --mpp 0.25 for a 40× scan, 0.5 for 20×)"
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


def read_model_region(reader: SlideReader, plan: SlidePlan, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """The slide region ``[y0, y0+h) × [x0, x0+w)`` in output (model-resolution) pixels, ``uint8 [h, w, 3]``.

    Resampled from ``plan.level`` with Lanczos over the exact (fractional) source box, so that
    overlapping tiles see identical pixels where they overlap.
    """
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


# ==================================================================================================
# Options, outputs, slide-level rule


@dataclass(frozen=True)
class SlideOptions:
    """Settings of :func:`translate_slide` (the CLI's options).

    ``margin`` < 0 → ``overlap // 4``. ``min_tissue``: a tile is run when more than this fraction of
    it is tissue (0 → any tissue). ``level_threshold``: see :func:`slide_level`.
    """

    tile: int = 512
    overlap: int = 64
    margin: int = -1
    batch_size: int = 8
    compression: str = "jpeg"
    quality: int = 90
    layout: str = "ome"
    out_tile: int = 256
    slide_mpp: float | None = None
    resume: bool = False
    keep_work: bool = False
    all_tiles: bool = False
    min_tissue: float = 0.0
    thumbnail_side: int = 1024
    level_threshold: float = 0.10
    precision: str = "auto"
    progress: bool = True
    workers: int = 2


@dataclass(frozen=True)
class SlideOutputs:
    """Paths written for one slide: the TIFF and its side files, plus the work folder."""

    tiff: Path
    heatmap: Path
    tiles_csv: Path
    summary: Path
    work: Path

    @classmethod
    def for_tiff(cls, tiff: str | os.PathLike[str]) -> SlideOutputs:
        t = Path(tiff)
        stem = _strip_suffixes(t.name)
        d = t.parent
        return cls(t, d / f"{stem}.heatmap.png", d / f"{stem}.tiles.csv", d / f"{stem}.summary.json",
                   d / f".{stem}.work")


def _strip_suffixes(name: str) -> str:
    low = name.lower()
    for sfx in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if low.endswith(sfx):
            return name[: -len(sfx)]
    return Path(name).stem


def slide_level(level_fractions: Sequence[float], threshold: float = 0.10) -> int:
    """Slide-level HER2 class from the fractions of tissue tiles whose most probable class is k.

    The highest k such that more than ``threshold`` of the tissue tiles are classed k or higher
    (after the ASCO/CAP wording "in more than 10 % of tumour cells"); 0 when none is.
    """
    f = np.asarray(level_fractions, dtype=np.float64)
    at_least = np.cumsum(f[::-1])[::-1]  # fraction classed ≥ k
    ks = np.nonzero(at_least > threshold)[0]
    return int(ks.max()) if len(ks) else 0


# ==================================================================================================
# Core loop


def _infer_tiles(lm: LoadedModel, tiles: list[np.ndarray], precision: str) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 tiles → (virtual IHC float32 ``[N, T, T, 3]`` in [0, 1], probabilities ``[N, K]`` or None)."""
    x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2)
    x = uint8_to_model(x.to(lm.device, non_blocking=True))
    ihc, probs = predict(lm.model, x, multiple=lm.multiple, precision=precision)
    out = ((ihc + 1.0) * 0.5).clamp_(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return out, (None if probs is None else probs.cpu().numpy())


def _file_sig(p: Path) -> list[Any]:
    st = p.stat()
    return [str(p.resolve()), st.st_size, int(st.st_mtime)]


def _save_band(path: Path, rows: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(rows).save(tmp, format="PNG", compress_level=1)


def _load_band(path: Path, shape: tuple[int, int]) -> np.ndarray:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    if arr.shape[:2] != shape:
        raise SlideError(f"{path}: band of shape {arr.shape[:2]}, expected {shape}; delete the work folder and rerun")
    return arr


def translate_slide(
    lm: LoadedModel,
    slide: str | os.PathLike[str],
    out: str | os.PathLike[str],
    options: SlideOptions = SlideOptions(),
) -> dict[str, Any]:
    """Translate one slide into a pyramidal (OME-)TIFF of virtual IHC with heat map, tile CSV and summary.

    Args:
        lm: loaded model (:func:`~.patches.load_model`).
        slide: slide file.
        out: output TIFF path (``*.ome.tiff``).
        options: see :class:`SlideOptions`.

    Returns:
        The summary (also written as ``<stem>.summary.json``).

    Raises:
        SlideError: unreadable slide, unknown resolution, bad tile settings, or a work folder from
            other settings when resuming.
    """
    from .ometiff import remove_tree, write_pyramid

    t_start = time.perf_counter()
    slide = Path(slide)
    outs = SlideOutputs.for_tiff(out)
    o = options
    if o.tile % lm.multiple:
        raise SlideError(f"--tile {o.tile} must be a multiple of {lm.multiple} for this model")
    if not 0 <= o.overlap < o.tile:
        raise SlideError(f"--overlap must be in [0, tile): got {o.overlap} with tile {o.tile}")
    try:
        precision = resolved_precision(lm.model, lm.device, o.precision)
    except ValueError as exc:
        raise SlideError(str(exc)) from exc
    with open_slide(slide) as reader:
        try:
            plan = plan_slide(reader, lm.mpp, tile=o.tile, overlap=o.overlap, margin=o.margin, slide_mpp=o.slide_mpp)
        except ValueError as exc:
            if isinstance(exc, SlideError):
                raise
            raise SlideError(f"{slide}: {exc}") from exc
        grid = plan.grid
        # Tissue mask and which tiles to run.
        thumb = reader.thumbnail(o.thumbnail_side)
        thumb_mpp = plan.slide_mpp * reader.dimensions[0] / thumb.shape[1]
        mask = tissue_mask(thumb, thumb_mpp)
        boxes = np.array([grid.box(i, j) for i in range(grid.n_rows) for j in range(grid.n_cols)], dtype=np.int64)
        frac = tile_tissue_fraction(mask, boxes, thumb.shape[1] / plan.width).reshape(grid.n_rows, grid.n_cols)
        run = np.ones_like(frac, dtype=bool) if o.all_tiles else frac > o.min_tissue
        n_run = int(run.sum())

        # Work folder and resume state.
        settings = {
            "slide": _file_sig(slide), "model": _file_sig(lm.path), "tile": o.tile, "overlap": o.overlap,
            "margin": grid.margin, "scale": plan.scale, "level": plan.level, "height": plan.height,
            "width": plan.width, "run": run.astype(int).tolist(),
            # Numerics: bands saved at another precision or by the other path would not match new ones.
            "precision": precision,
            "fast": isinstance(lm.model, InferenceModel),
        }
        progress_path = outs.work / "progress.json"
        done: dict[int, Any] = {}
        if o.resume and progress_path.is_file():
            state = json.loads(progress_path.read_text())
            if state.get("format") != PROGRESS_FORMAT or state.get("settings") != settings:
                diff = sorted(k for k in settings if state.get("settings", {}).get(k) != settings[k])
                raise SlideError(
                    f"{outs.work}: the saved progress was made with other settings ({', '.join(diff) or 'format'}); "
                    f"delete that folder or run without --resume"
                )
            # A band is done when its image and then its side file (rows, probabilities) were written.
            for i in range(grid.n_rows):
                side = outs.work / f"band_{i:05d}.json"
                if side.is_file() and (outs.work / f"band_{i:05d}.png").is_file():
                    done[i] = json.loads(side.read_text())
        else:
            remove_tree(outs.work)
            outs.work.mkdir(parents=True, exist_ok=True)
            write_json(progress_path, {"format": PROGRESS_FORMAT, "settings": settings})

        probs_grid: list[list[list[float] | None]] = [[None] * grid.n_cols for _ in range(grid.n_rows)]
        for i, v in done.items():
            probs_grid[i] = v["probs"]
        n_done_tiles = int(sum(run[i].sum() for i in done))
        computed = {"tiles": 0, "seconds": 0.0}
        bar = _progress_bar(n_run, n_done_tiles, slide.name, o.progress)

        def base_rows() -> Iterator[np.ndarray]:
            blender: BandBlender | None = None
            with cf.ThreadPoolExecutor(max_workers=max(1, o.workers)) as pool:
                def submit(i: int) -> list[tuple[int, cf.Future[np.ndarray]]]:
                    y0 = int(grid.ys[i])
                    return [(j, pool.submit(read_model_region, reader, plan, y0, int(grid.xs[j]), o.tile, o.tile))
                            for j in range(grid.n_cols) if run[i, j]]

                pending: dict[int, list[tuple[int, cf.Future[np.ndarray]]]] = {}
                for i in range(grid.n_rows):
                    start, end = grid.final_rows(i)
                    if i in done:
                        yield _load_band(outs.work / f"band_{i:05d}.png", (end - start, plan.width))
                        continue
                    if blender is None or blender.row != i:
                        # Fresh start (or resume): recompute from the first tile row reaching row ys[i],
                        # whose contributions to rows ≥ ys[i] are needed; its own finished rows are discarded.
                        r0 = int(np.searchsorted(grid.ys + o.tile, grid.ys[i], side="right"))
                        blender = BandBlender(grid, channels=3, start_row=r0)
                        for r in range(r0, i):
                            _blend_row(lm, blender, r, pending.pop(r, None) or submit(r), run, o)
                            blender.finish_row()
                    futures = pending.pop(i, None) or submit(i)
                    if i + 1 < grid.n_rows and (i + 1) not in done:
                        pending[i + 1] = submit(i + 1)  # prefetch the next row while this one runs
                    t0 = time.perf_counter()
                    row_probs = _blend_row(lm, blender, i, futures, run, o, bar)
                    computed["seconds"] += time.perf_counter() - t0
                    computed["tiles"] += int(run[i].sum())
                    rows = blender.finish_row()
                    band = np.clip(rows * 255.0 + 0.5, 0, 255).astype(np.uint8)
                    _save_band(outs.work / f"band_{i:05d}.png", band)
                    probs_grid[i] = row_probs
                    write_json(outs.work / f"band_{i:05d}.json", {"rows": [start, end], "probs": row_probs})
                    yield band

        try:
            pyramid = write_pyramid(
                outs.tiff, base_rows(), plan.height, plan.width, plan.model_mpp, work_dir=outs.work,
                tile=o.out_tile, compression=o.compression, quality=o.quality, layout=o.layout,
                name=f"virtual IHC of {slide.name}",
                description=f"derestainer virtual IHC of {slide.name}; model {lm.path.name}; mpp {plan.model_mpp:.6g}",
            )
        finally:
            bar.close()

        summary = _summarise(lm, slide, outs, reader, plan, o, mask, thumb_mpp, frac, run, probs_grid, pyramid,
                             resumed=bool(done), computed=computed, seconds=time.perf_counter() - t_start)
        _write_tiles_csv(outs.tiles_csv, grid, frac, run, probs_grid, lm.level_names)
        if summary["level_predictions"]:
            write_heatmap(outs.heatmap, thumb, mask, plan, probs_grid, lm.level_names, title=slide.name)
        write_json(outs.summary, summary)
    if not o.keep_work:
        remove_tree(outs.work)
    return summary


def _blend_row(
    lm: LoadedModel,
    blender: BandBlender,
    i: int,
    futures: list[tuple[int, cf.Future[np.ndarray]]],
    run: np.ndarray,
    o: SlideOptions,
    bar: Any = None,
) -> list[list[float] | None]:
    """Run the tissue tiles of tile row ``i`` in batches and add them (and white for the rest) to ``blender``."""
    n_cols = run.shape[1]
    probs: list[list[float] | None] = [None] * n_cols
    for j in range(n_cols):
        if not run[i, j]:
            blender.add_constant(j, 1.0)  # background: white
    for b in range(0, len(futures), o.batch_size):
        chunk = futures[b:b + o.batch_size]
        tiles = [f.result() for _, f in chunk]
        out, p = _infer_tiles(lm, tiles, o.precision)
        for k, (j, _) in enumerate(chunk):
            blender.add(j, out[k])
            if p is not None:
                probs[j] = [float(v) for v in p[k]]
        if bar is not None:
            bar.update(len(chunk))
    return probs


def _progress_bar(total: int, initial: int, name: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="tile", desc=name, disable=not enabled, dynamic_ncols=True,
                smoothing=0.1)


def _summarise(
    lm: LoadedModel, slide: Path, outs: SlideOutputs, reader: SlideReader, plan: SlidePlan, o: SlideOptions,
    mask: np.ndarray, thumb_mpp: float, frac: np.ndarray, run: np.ndarray,
    probs_grid: list[list[list[float] | None]], pyramid: dict[str, Any], *, resumed: bool,
    computed: dict[str, Any], seconds: float,
) -> dict[str, Any]:
    names = lm.level_names
    tissue_probs = [p for row in probs_grid for p in row if p is not None]
    has_head = bool(tissue_probs)
    mean = np.mean(tissue_probs, axis=0) if has_head else None
    fractions = (np.bincount(np.argmax(tissue_probs, axis=1), minlength=len(names)) / len(tissue_probs)
                 if has_head else None)
    level = slide_level(fractions, o.level_threshold) if fractions is not None else None
    grid = plan.grid
    return {
        "slide": str(slide),
        "output": str(outs.tiff),
        "reader": reader.vendor,
        "slide_size": list(reader.dimensions),
        "slide_mpp": plan.slide_mpp,
        "mpp_source": plan.mpp_source,
        "model": str(lm.path),
        "model_mpp": plan.model_mpp,
        "level_read": plan.level,
        "level_downsample": plan.level_downsample,
        "resample_factor": plan.resample,
        "output_size": [plan.width, plan.height],
        "pyramid": pyramid,
        "tile": o.tile, "overlap": o.overlap, "margin": grid.margin,
        "tiles": {"total": len(grid), "run": int(run.sum()), "skipped": int(len(grid) - run.sum()),
                  "computed_this_session": computed["tiles"]},
        "tissue_area_mm2": float(mask.sum() * thumb_mpp**2 / 1e6),
        "tissue_fraction": float(mask.mean()),
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
        "resumed": resumed,
        "device": str(lm.device),
        "seconds": seconds,
        "model_seconds": computed["seconds"],
        "tiles_per_second": (computed["tiles"] / computed["seconds"]) if computed["seconds"] > 0 else None,
    }


def _write_tiles_csv(path: Path, grid: TileGrid, frac: np.ndarray, run: np.ndarray,
                     probs_grid: list[list[list[float] | None]], names: Sequence[str]) -> None:
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(["row", "col", "y", "x", "size", "tissue_fraction", "run", "level", "expected_level"]
                + [f"p_{n}" for n in names])
    for i in range(grid.n_rows):
        for j in range(grid.n_cols):
            p = probs_grid[i][j]
            extra = ([names[int(np.argmax(p))], f"{float(np.dot(p, np.arange(len(p)))):.4f}"]
                     + [f"{v:.6f}" for v in p]) if p is not None else [""] * (2 + len(names))
            wr.writerow([i, j, int(grid.ys[i]), int(grid.xs[j]), grid.tile, f"{frac[i, j]:.4f}", int(run[i, j])] + extra)
    write_text(path, buf.getvalue())


def heatmap_grid(probs_grid: list[list[list[float] | None]]) -> np.ndarray:
    """Expected HER2 level ``Σ k·p_k`` per tile, NaN where the tile was not run: float ``[n_rows, n_cols]``."""
    out = np.full((len(probs_grid), len(probs_grid[0]) if probs_grid else 0), np.nan)
    for i, row in enumerate(probs_grid):
        for j, p in enumerate(row):
            if p is not None:
                out[i, j] = float(np.dot(p, np.arange(len(p))))
    return out


def write_heatmap(path: Path, thumb: np.ndarray, mask: np.ndarray, plan: SlidePlan,
                  probs_grid: list[list[list[float] | None]], names: Sequence[str], title: str = "") -> None:
    """H&E thumbnail beside the expected-level heat map (nearest tile centre per pixel, tissue only)."""
    # An Agg canvas of its own: no pyplot, so the user's backend (e.g. Jupyter's) is left alone.
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
    iy = np.abs(cy[:, None] - (grid.ys + grid.tile / 2)[None, :]).argmin(axis=1)
    ix = np.abs(cx[:, None] - (grid.xs + grid.tile / 2)[None, :]).argmin(axis=1)
    heat = values[iy[:, None], ix[None, :]]
    heat[~mask] = np.nan
    gray = thumb.mean(axis=-1) / 255.0
    fig = Figure(figsize=(10, min(5.0 * th / max(tw, 1), 12.0) + 0.8), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    axes[0].imshow(thumb, interpolation="nearest")
    axes[0].set_title("H&E")
    axes[1].imshow(gray, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    im = axes[1].imshow(np.ma.masked_invalid(heat), cmap="YlOrBr", vmin=0, vmax=len(names) - 1, alpha=0.85,
                        interpolation="nearest")
    axes[1].set_title("predicted HER2 level (expected, per tile)")
    for ax in axes:
        ax.set_axis_off()
    cb = fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.02, ticks=range(len(names)))
    cb.ax.set_yticklabels(list(names))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    from ..io import write_bytes

    write_bytes(path, buf.getvalue())


# ==================================================================================================
# Many slides


def list_slides(inputs: Sequence[str | os.PathLike[str]], recursive: bool = False) -> list[Path]:
    """Slide files from files and folders (folders: files with a slide suffix, sorted)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            it = p.rglob("*") if recursive else p.iterdir()
            out.extend(sorted(f for f in it if f.is_file() and not f.name.startswith(".")
                              and f.name.lower().endswith(SLIDE_SUFFIXES)))
        elif p.is_file():
            out.append(p)
        else:
            raise SlideError(f"{p}: no such slide file or folder")
    if not out:
        raise SlideError("no slides found in the inputs")
    return out


def output_for(slides: Sequence[Path], out: str | os.PathLike[str]) -> list[Path]:
    """Output TIFF per slide: ``out`` itself when it names a ``.tif(f)`` file (one slide only), else ``out/<stem>.ome.tiff``.

    Raises:
        SlideError: several slides with one file name, or two slides with the same stem.
    """
    o = Path(out)
    if o.name.lower().endswith((".tif", ".tiff")):
        if len(slides) != 1:
            raise SlideError(f"{o}: a single output file for {len(slides)} slides; give a folder as --out")
        return [o]
    paths = [o / f"{_strip_suffixes(s.name)}.ome.tiff" for s in slides]
    seen: dict[Path, Path] = {}
    for s, pth in zip(slides, paths):
        if pth in seen:
            raise SlideError(f"{seen[pth]} and {s} would both be written to {pth}")
        seen[pth] = s
    return paths


def shard(items: Sequence[Any], rank: int, world: int) -> list[Any]:
    """Items of this rank: item ``i`` goes to rank ``i % world`` (torchrun's RANK / WORLD_SIZE)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad rank {rank} of world size {world}")
    return [x for i, x in enumerate(items) if i % world == rank]


def dist_rank_world() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` from the environment (torchrun), ``(0, 1)`` otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


__all__ = [
    "ImageReader", "OpenSlideReader", "SlideError", "SlideOptions", "SlideOutputs", "SlidePlan", "SlideReader",
    "TiffReader", "dist_rank_world", "heatmap_grid", "list_slides", "open_slide", "output_for", "plan_slide",
    "read_model_region", "shard", "slide_level", "translate_slide", "write_heatmap",
]

"""Whole-slide *reading*: one minimal multi-resolution reader interface and three implementations.

- :class:`OpenSlideReader`: SVS, NDPI, MRXS, SCN, VMS, BIF, DICOM, generic tiled TIFF (OpenSlide);
- :class:`TiffReader`: TIFFs OpenSlide does not take (striped, OME-TIFF), through tifffile;
- :class:`ImageReader`: PNG/JPEG and other flat images, through Pillow.

:func:`open_slide` picks one by the file's suffix and content. Readers work in level coordinates
and return white outside the slide. openslide and tifffile are optional (the ``wsi`` extra), so
they are imported by the reader that needs them.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from derestainer.core.errors import ImageReadError, SlideError
from derestainer.core.io import check_image, env_limit, read_image
from derestainer.inference.tiling import extract_tile

if TYPE_CHECKING:
    from typing_extensions import Self

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".btf", ".tf8", ".tf2", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs",
                  ".svslide", ".bif", ".dcm", ".png", ".jpg", ".jpeg")


class SlideReader:
    """Minimal multi-resolution reader interface (level coordinates; outside the slide is white).

    Attributes:
        path: the slide file.
        level_dimensions: ``(width, height)`` per level, level 0 first.
        level_downsamples: level-0 pixels per level pixel.
        mpp: microns per pixel of level 0, or None if the file does not say.
        mpp_source: where ``mpp`` came from.
        vendor: reader/format name.
        objective_power: the scanner's objective magnification (e.g. 40), or None if the file does not say.
    """

    path: Path
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp: float | None = None
    mpp_source: str = ""
    vendor: str = ""
    objective_power: float | None = None

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
        import openslide  # optional (the wsi extra)

        self.path = Path(path)
        try:
            self._s = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideError as exc:
            raise SlideError(f"{self.path}: OpenSlide cannot read it ({exc})") from exc
        self.level_dimensions = [(int(d[0]), int(d[1])) for d in self._s.level_dimensions]
        self.level_downsamples = [float(d) for d in self._s.level_downsamples]
        props = self._s.properties
        self.vendor = f"openslide:{props.get('openslide.vendor', 'unknown')}"
        mpp = props.get("openslide.mpp-x")
        if mpp:
            with contextlib.suppress(ValueError):
                if float(mpp) > 0:
                    self.mpp, self.mpp_source = float(mpp), "openslide.mpp-x"
        self.objective_power = _positive(props.get("openslide.objective-power") or props.get("aperio.AppMag"))

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        img = self._s.read_region((round(x * ds), round(y * ds)), level, (int(w), int(h)))
        return _composite_white(np.asarray(img))

    def close(self) -> None:
        self._s.close()


def _positive(text: Any) -> float | None:
    """``text`` as a positive finite number, else None."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _tiff_objective(tf: Any) -> float | None:
    """Objective power of a TIFF: Aperio ``AppMag =``, else the first OME Objective's ``NominalMagnification``."""
    m = re.search(r"\bAppMag\s*=\s*([0-9.eE+-]+)", tf.pages[0].description or "")
    if m:
        return _positive(m.group(1))
    if getattr(tf, "is_ome", False) and tf.ome_metadata:
        m = re.search(r'<(?:\w+:)?Objective\b[^>]*\bNominalMagnification="([^"]+)"', tf.ome_metadata)
        if m:
            return _positive(m.group(1))
    return None


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
    unit_tag = page.tags.get("ResolutionUnit")
    if xres is not None and unit_tag is not None:
        num, den = xres.value
        if num > 0 and den > 0:
            px_per_unit = num / den
            unit_code = int(unit_tag.value)
            if unit_code == 3:  # centimetre
                return 1e4 / px_per_unit, "TIFF resolution (cm)"
            if unit_code == 2:  # inch: 72/96/300 dpi defaults are not microscope resolutions
                mpp = 25400.0 / px_per_unit
                if mpp < 50:
                    return mpp, "TIFF resolution (inch)"
    return None, ""


class TiffReader(SlideReader):
    """tifffile (plus zarr for region reads when installed): striped or tiled TIFF, OME-TIFF, SVS."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import tifffile  # optional (the wsi extra)

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
        self.objective_power = _tiff_objective(self._tf)
        self._series = series
        self._levels = levels
        self._arrays: dict[int, Any] = {}

    def _array(self, level: int) -> Any:
        if level not in self._arrays:
            try:
                import zarr  # optional: lazy region reads

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


#: Deflate cannot compress more than about 1032:1, so a PNG smaller than its pixels / this is not a
#: real image of that size (a truncated or crafted file): refused before anything is allocated.
PNG_MAX_RATIO = 1100


def decode_budget_pixels() -> int:
    """Largest flat image (PNG, JPEG, ...) decoded whole as a slide: a quarter of
    ``DERESTAINER_MAX_SLIDE_DECODE_BYTES`` (default: half the physical memory, at most 16 GiB)."""
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        phys = 8 << 30
    return max(1, env_limit("DERESTAINER_MAX_SLIDE_DECODE_BYTES", min(16 << 30, phys // 2)) // 4)


def _check_compression(path: Path, w: int, h: int) -> None:
    if path.suffix.lower() == ".png" and w * h * 3 > PNG_MAX_RATIO * max(1, path.stat().st_size):
        raise SlideError(f"{path}: {w}×{h} px in a {path.stat().st_size:,}-byte PNG is more than deflate can "
                         "compress (truncated or crafted file); refused before decoding")


class ImageReader(SlideReader):
    """Pillow, for PNG/JPEG and other flat images (decoded whole: they have no tiles to read lazily)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        budget = decode_budget_pixels()
        try:
            w, h = check_image(self.path, max_pixels=1 << 62)
            if w * h > budget:
                raise SlideError(f"{self.path}: a {w}×{h} px flat image is decoded whole, more than the "
                                 f"{budget:,} px this machine allows (DERESTAINER_MAX_SLIDE_DECODE_BYTES); "
                                 "convert it to a tiled pyramidal TIFF (e.g. `vips tiffsave IN OUT.tif --tile --pyramid`)")
            _check_compression(self.path, w, h)
            self._img = read_image(self.path, max_pixels=budget)
        except ImageReadError as exc:
            raise SlideError(str(exc)) from None
        h, w = self._img.shape[:2]
        self.level_dimensions = [(w, h)]
        self.level_downsamples = [1.0]
        self.vendor = "pillow"

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
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
            import openslide  # optional (the wsi extra)

            if openslide.OpenSlide.detect_format(str(p)):
                return OpenSlideReader(p)
        except ImportError:
            pass
    if is_tiff:
        return TiffReader(p)
    if name.endswith((".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide", ".dcm")):
        raise SlideError(f"{p}: this format needs OpenSlide (pip install openslide-python openslide-bin)")
    return ImageReader(p)


__all__ = ["SLIDE_SUFFIXES", "ImageReader", "OpenSlideReader", "SlideReader", "TiffReader", "open_slide"]

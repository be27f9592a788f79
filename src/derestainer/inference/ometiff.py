"""Streaming writer of tiled, pyramidal (OME-)TIFF files with physical pixel size.

The base level is consumed as a stream of full-width row blocks (never the whole image); each
reduced level (2× area-averaged) is built from the level above while that level is written, spooled
to a work folder as compressed chunks, and written next. Peak memory is a few row bands of the
image width, whatever the image height.

Two layouts:

- ``ome`` (default): OME-TIFF, pyramid in SubIFDs of the base image (OME-TIFF 6 pyramid; what
  QuPath/Bio-Formats and tiffslide read as one multi-resolution image). OpenSlide 4 reads it as a
  generic TIFF with level 0 only (its correct size and µm/px, just no reduced levels).
- ``openslide``: a plain pyramidal tiled TIFF with the reduced levels as further top-level pages
  (the layout of ``vips tiffsave --pyramid``); OpenSlide sees every level; QuPath opens it through
  OpenSlide. No OME-XML.

The OME-XML is written by :func:`.provenance.ome_xml` (``OME/@Creator`` derestainer; with
``PyramidOptions.provenance``, the virtual-stain note, a MapAnnotation with the record and the
Objective's magnification); the ``openslide`` layout gets that record as JSON in ImageDescription.
Every page's Software tag is ``derestainer <version>``.

Both carry the pixel size as TIFF resolution tags (pixels per centimetre), which OpenSlide turns
into ``openslide.mpp-x/y``; the OME layout also as OME ``PhysicalSizeX/Y`` in µm.

Compression: ``jpeg`` (quality 90 by default; what scanners write, ~10× smaller) or ``lossless``
(Deflate with horizontal predictor, readable by every TIFF reader including OpenSlide and
Bio-Formats; JPEG-XL/JPEG 2000 in TIFF are not read by OpenSlide and are not used).

Memory held per level (counted in :class:`PyramidStats`): the rows waiting to be cut into TIFF
tiles (< ``tile`` + the largest incoming block), the next level's rows waiting to be spooled
(< ``rows_per_file`` + the largest reduced block) and tifffile's encoder batch, limited to one row of
TIFF tiles (when tifffile encodes in several threads, i.e. on ≥ 4 CPUs, its default batch of 512 MB
of raw tiles takes a whole level of most slides at once, and keeps all their encoded bytes).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from derestainer.core.io import atomic_path
from derestainer.inference.provenance import description_json, ome_xml, software
from derestainer.inference.tiling import HighWater, downsample2_rows, rows_to_tiles


def level_shapes(height: int, width: int, tile: int = 256, min_side: int | None = None) -> list[tuple[int, int]]:
    """Sizes ``(h, w)`` of the pyramid: base, then halved (rounding up) until the longer side ≤ ``min_side``.

    ``min_side`` defaults to ``tile`` (the smallest level fits in one tile row or column).
    """
    min_side = tile if min_side is None else min_side
    shapes = [(height, width)]
    while max(shapes[-1]) > min_side:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


class _Spool:
    """Row blocks saved to numbered compressed ``.npz`` files, read back once in order (then deleted).

    A spool holds one reduced pyramid level (a quarter of the level above) between its creation
    while the level above is written and its own writing: memory stays at one file's worth of rows.
    """

    def __init__(self, folder: Path, name: str, rows_per_file: int = 256, held: HighWater | None = None) -> None:
        self.folder = folder
        self.name = name
        self.rows_per_file = rows_per_file
        self.held = HighWater() if held is None else held  # rows in memory: < rows_per_file + one block
        self.count = 0
        self._pending: list[np.ndarray] = []
        self._n = 0
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob(f"{name}_*.npz"):
            old.unlink()

    def write(self, block: np.ndarray) -> None:
        self._pending.append(block)
        self._n += block.shape[0]
        self.held.take(block.shape[0])
        if self._n >= self.rows_per_file:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        data = np.concatenate(self._pending, axis=0)
        path = self.folder / f"{self.name}_{self.count:06d}.npz"
        np.savez_compressed(path, rows=data)
        self.count += 1
        self.held.release(self._n)
        self._pending, self._n = [], 0

    def close(self) -> None:
        self._flush()

    def __iter__(self) -> Iterator[np.ndarray]:
        for k in range(self.count):
            path = self.folder / f"{self.name}_{k:06d}.npz"
            with np.load(path) as f:
                rows = f["rows"]
            path.unlink()
            yield rows


def _tee_downsample(rows: Iterable[np.ndarray], spool: _Spool | None) -> Iterator[np.ndarray]:
    """Pass ``rows`` through unchanged while spooling their 2× reduction (if ``spool``)."""
    if spool is None:
        yield from rows
        return
    pending: list[np.ndarray] = []

    def gen() -> Iterator[np.ndarray]:
        for block in rows:
            pending.append(block)
            yield block

    # downsample2_rows pulls blocks from gen(); we forward each block as soon as it is pulled.
    ds = downsample2_rows(gen())
    for small in ds:
        spool.write(small)
        while pending:
            yield pending.pop(0)
    while pending:
        yield pending.pop(0)
    spool.close()


#: TIFF compression of the pyramid: JPEG at a quality, or Deflate with predictor.
Compression = Literal["jpeg", "lossless"]
#: Where the reduced levels go: SubIFDs of an OME-TIFF, or further top-level pages.
Layout = Literal["ome", "openslide"]
COMPRESSIONS: tuple[str, ...] = get_args(Compression)
LAYOUTS: tuple[str, ...] = get_args(Layout)


@dataclass(frozen=True)
class PyramidOptions:
    """How :func:`write_pyramid` writes the file.

    Attributes:
        tile: TIFF tile side (multiple of 16).
        compression: ``jpeg`` or ``lossless`` (Deflate + predictor).
        quality: JPEG quality.
        layout: ``ome`` (SubIFD pyramid, OME-XML) or ``openslide`` (top-level reduced pages).
        name: OME image name.
        description: ImageDescription for the ``openslide`` layout (without ``provenance``).
        provenance: the record of :func:`.provenance.slide_provenance` to embed (module docstring).
    """

    tile: int = 256
    compression: Compression = "jpeg"
    quality: int = 90
    layout: Layout = "ome"
    name: str = "virtual IHC"
    description: str = ""
    provenance: Mapping[str, Any] | None = None

    def with_provenance(self, provenance: Mapping[str, Any] | None) -> PyramidOptions:
        """These options with ``provenance`` to embed."""
        return dataclasses.replace(self, provenance=provenance)

    def check(self) -> None:
        """Raises ValueError for an unknown compression or layout, or a tile side that is not a multiple of 16."""
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {self.compression!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.tile % 16:
            raise ValueError(f"TIFF tile side must be a multiple of 16, got {self.tile}")


@dataclass
class PyramidStats:
    """What :func:`write_pyramid` held in memory, one entry per level (bounds in the module docstring).

    Attributes:
        tiler: rows waiting to be cut into TIFF tiles (``.max``: the most at once).
        spool: rows of the next level waiting to be spooled (none for the last level).
        encoder_buffer: bytes of raw tiles tifffile may gather before encoding (None: its default).
    """

    tiler: list[HighWater] = field(default_factory=list)
    spool: list[HighWater] = field(default_factory=list)
    encoder_buffer: list[int | None] = field(default_factory=list)


@functools.cache
def _write_takes_buffersize() -> bool:
    import tifffile  # optional (the wsi extra)

    return "buffersize" in inspect.signature(tifffile.TiffWriter.write).parameters


def encoder_buffer(tile: int, width: int) -> int:
    """Bytes of one row of ``tile × tile`` RGB uint8 TIFF tiles over ``width``: tifffile's encoder batch."""
    return -(-width // tile) * tile * tile * 3


def _common_kwargs(o: PyramidOptions) -> dict[str, Any]:
    """tifffile ``write`` arguments shared by every level: tiling, colour, compression."""
    common: dict[str, Any] = {"tile": (o.tile, o.tile), "photometric": "rgb", "dtype": np.uint8,
                              "resolutionunit": "CENTIMETER", "software": software()}
    if o.compression == "jpeg":
        common.update(compression="jpeg", compressionargs={"level": int(o.quality)})
    else:
        common.update(compression="zlib", compressionargs={"level": 6}, predictor=True)
    return common


def _level_kwargs(o: PyramidOptions, k: int, shape: tuple[int, int], n_levels: int, mpp: float) -> dict[str, Any]:
    """tifffile ``write`` arguments of level ``k`` (``shape``, of ``n_levels``) beyond the common ones; ``mpp``: of the base.

    tifffile writes no metadata of its own: the first page's ImageDescription is ours (OME-XML or text).
    """
    if k > 0:  # reduced-resolution image
        return {"subfiletype": 1, "metadata": None}
    if o.layout == "openslide":
        text = description_json(o.name, o.provenance) if o.provenance else (o.description or o.name).encode()
        return {"description": text, "metadata": None}
    return {"subifds": n_levels - 1, "metadata": None,
            "description": ome_xml(o.name, shape[1], shape[0], mpp, o.provenance)}


def write_pyramid(
    path: str | os.PathLike[str],
    rows: Iterable[np.ndarray],
    height: int,
    width: int,
    mpp: float,
    *,
    work_dir: str | os.PathLike[str],
    options: PyramidOptions = PyramidOptions(),
    stats: PyramidStats | None = None,
    before_rename: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Write a tiled pyramidal TIFF from a stream of full-width RGB row blocks, atomically.

    Args:
        path: output file (``.ome.tiff`` for the OME layout by convention).
        rows: uint8 blocks ``[r, width, 3]``, top to bottom, summing to ``height`` rows.
        height, width: base image size.
        mpp: microns per pixel of the base level.
        work_dir: folder for the spooled reduced levels (created; emptied of spool files after).
        options: tile side, compression, layout, names (:class:`PyramidOptions`).
        stats: filled with what each level held in memory (:class:`PyramidStats`).
        before_rename: called once the file is complete, just before it is renamed to ``path``.

    Returns:
        ``{"levels": [(h, w), ...], "mpp": [...per level], "compression", "layout", "tile", "provenance"}``
        (``provenance``: the record embedded, or None).

    Raises:
        ValueError: bad options, or row blocks that do not make a ``height × width`` RGB image.

    Nothing is left at ``path`` if writing fails or is interrupted (temporary name, then rename).
    """
    o = options
    o.check()
    shapes = level_shapes(height, width, o.tile)
    work = Path(work_dir)
    stats = PyramidStats() if stats is None else stats
    spools: list[_Spool] = []
    try:
        with atomic_path(path) as tmp:
            _write_levels(tmp, rows, shapes, work, o, mpp, width, stats, spools)
            if before_rename is not None:
                before_rename()
    finally:
        for sp in spools:
            for f in sp.folder.glob(f"{sp.name}_*.npz"):
                f.unlink()
    return {
        "levels": [list(s) for s in shapes],
        "mpp": [mpp * width / s[1] for s in shapes],
        "compression": o.compression,
        "layout": o.layout,
        "tile": o.tile,
        "provenance": None if o.provenance is None else dict(o.provenance),
    }


def _write_levels(tmp: Path, rows: Iterable[np.ndarray], shapes: list[tuple[int, int]], work: Path, o: PyramidOptions,
                  mpp: float, width: int, stats: PyramidStats, spools: list[_Spool]) -> None:
    """Every level of the pyramid into the TIFF at ``tmp`` (the base from ``rows``, each next one spooled)."""
    import tifffile  # optional (the wsi extra)

    common = _common_kwargs(o)
    with tifffile.TiffWriter(tmp, bigtiff=True, ome=False) as tif:  # the OME-XML is ours (_level_kwargs)
        for k, (h, w) in enumerate(shapes):
            src: Iterable[np.ndarray] = rows if k == 0 else spools[k - 1]
            nxt = _Spool(work, f"level{k + 1}") if k + 1 < len(shapes) else None
            if nxt is not None:
                spools.append(nxt)
                stats.spool.append(nxt.held)
            stats.tiler.append(HighWater())
            stats.encoder_buffer.append(encoder_buffer(o.tile, w) if _write_takes_buffersize() else None)
            buffer: dict[str, Any] = {} if stats.encoder_buffer[-1] is None else {"buffersize": stats.encoder_buffer[-1]}
            stream = _checked(_tee_downsample(src, nxt), h, w, k)
            px_per_cm = 1e4 / (mpp * width / w)
            tif.write(rows_to_tiles(stream, w, o.tile, held=stats.tiler[-1]), **common, **buffer, shape=(h, w, 3),
                      resolution=(px_per_cm, px_per_cm), **_level_kwargs(o, k, (h, w), len(shapes), mpp))
            # tifffile stops pulling once it has every tile; run the stream to its end so that the
            # row count is checked and the next level's spool is flushed.
            for _ in stream:
                pass


def _checked(rows: Iterable[np.ndarray], h: int, w: int, level: int) -> Iterator[np.ndarray]:
    """Forward row blocks, checking widths, dtype and that exactly ``h`` rows arrive."""
    n = 0
    for block in rows:
        if block.dtype != np.uint8 or block.ndim != 3 or block.shape[1:] != (w, 3):
            raise ValueError(f"level {level}: row block {block.dtype} {block.shape}, expected uint8 [r, {w}, 3]")
        n += block.shape[0]
        if n > h:
            raise ValueError(f"level {level}: more than {h} rows")
        yield block
    if n != h:
        raise ValueError(f"level {level}: got {n} rows, expected {h}")


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Delete a work folder (no error if absent)."""
    shutil.rmtree(path, ignore_errors=True)

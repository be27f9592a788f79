"""Settings of whole-slide translation (:func:`~derestainer.inference.wsi.translate_slide`), the CLI's options."""

from __future__ import annotations

from dataclasses import dataclass

from derestainer.core.errors import SlideError
from derestainer.inference.geometry import Geometry
from derestainer.inference.ometiff import Compression, Layout, PyramidOptions
from derestainer.inference.precision import Precision
from derestainer.stain.normalize import NormalizeMethod


@dataclass(frozen=True)
class SlideOptions:
    """Settings of :func:`~derestainer.inference.wsi.translate_slide` (the CLI's options).

    ``geometry``: ``native`` writes the slide's level-0 size and µm/px, ``model`` the model's
    (:mod:`.geometry`). ``margin`` < 0 → ``overlap // 4``. ``slide_mpp``: level-0 µm/px for every slide, over its metadata
    (``--mpp``); ``default_mpp``: µm/px only for slides whose metadata state none (``--default-mpp``).
    ``min_tissue``: a tile is run when more than this fraction of
    it is tissue (0 → any tissue). ``level_threshold``: see
    :func:`~derestainer.inference.slide_outputs.slide_level`. ``map_mpp``: the probability map's
    cell size in µm, rounded to whole model pixels (``--map-mpp``; None: the tile stride).
    """

    tile: int = 512
    overlap: int = 64
    margin: int = -1
    batch_size: int = 8
    compression: Compression = "jpeg"
    quality: int = 90
    layout: Layout = "ome"
    geometry: Geometry = "native"
    out_tile: int = 256
    slide_mpp: float | None = None
    default_mpp: float | None = None
    resume: bool = False
    keep_work: bool = False
    all_tiles: bool = False
    min_tissue: float = 0.0
    thumbnail_side: int = 1024
    level_threshold: float = 0.10
    precision: Precision = "auto"
    progress: bool = True
    workers: int = 2
    normalize: NormalizeMethod = "none"  # stain normalisation of the tiles read (inference.normalize)
    map_mpp: float | None = None  # µm per cell of NAME.her2.ome.tiff (None: the tile stride's; .her2_map)

    def check_tiles(self, multiple: int) -> None:
        """Raises SlideError when ``tile`` is not a multiple of the model's ``multiple`` or ``overlap`` is not in ``[0, tile)``."""
        if self.tile % multiple:
            raise SlideError(f"--tile {self.tile} must be a multiple of {multiple} for this model")
        if not 0 <= self.overlap < self.tile:
            raise SlideError(f"--overlap must be in [0, tile): got {self.overlap} with tile {self.tile}")

    def map_step(self, model_mpp: float) -> int | None:
        """The probability map's cell side in model pixels (None: the tile stride)."""
        if self.map_mpp is None:
            return None
        if not self.map_mpp > 0:
            raise SlideError(f"--map-mpp must be positive, got {self.map_mpp}")
        return max(1, round(self.map_mpp / model_mpp))

    def pyramid(self, name: str, description: str) -> PyramidOptions:
        """The options of the output TIFF."""
        return PyramidOptions(tile=self.out_tile, compression=self.compression, quality=self.quality,
                              layout=self.layout, name=name, description=description)


__all__ = ["SlideOptions"]

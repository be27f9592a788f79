"""Inference: patches and folders (:mod:`.patches`), whole slides (:mod:`.wsi`).

:mod:`.tiling` (tile grids, blending windows, streaming accumulators) and :mod:`.tissue` (tissue
masks) are pure numpy; :mod:`.ometiff` writes tiled pyramidal (OME-)TIFF files from row streams.
Heavy optional dependencies (openslide, tifffile) are imported where they are used.
"""

from __future__ import annotations

from .patches import (
    LoadedModel,
    load_model,
    pick_device,
    predict,
    resolve_checkpoint,
    translate_array,
    translate_files,
)
from .tiling import (
    BandBlender,
    TileGrid,
    axis_weights,
    grid_positions,
    raised_cosine_ramp,
)

__all__ = [
    "BandBlender", "LoadedModel", "TileGrid", "axis_weights", "grid_positions", "load_model", "pick_device",
    "predict", "raised_cosine_ramp", "resolve_checkpoint", "translate_array", "translate_files",
]

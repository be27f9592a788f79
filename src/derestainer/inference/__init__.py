"""Inference: patches and folders, whole slides, the fast path.

Patches and folders: :mod:`.loading` (load a model file, checkpoint or run folder; export one),
:mod:`.prediction` (one batch through the model: padding, test-time augmentation, precision),
:mod:`.folders` (image files and folders in, PNGs and predictions files out). The precision rule
lives in :mod:`.precision`, the fast path in :mod:`.optimize`.

Whole slides: :mod:`.slides` reads them, :mod:`.plan` maps them to the model's resolution and
picks the tissue tiles, :mod:`.stream` blends tiles into bands (resumable),
:mod:`.ometiff` writes the pyramidal TIFF, :mod:`.slide_outputs` the side files,
:mod:`.slide_jobs` handles many slides; :func:`.wsi.translate_slide` runs the steps.
:mod:`.tiling` (tile grids, blending windows, streaming accumulators) and :mod:`.tissue` (tissue
masks) are pure numpy. Heavy optional dependencies (openslide, tifffile) are imported where they
are used.
"""

from __future__ import annotations

from derestainer.core.device import resolve_device
from derestainer.core.runs import resolve_generator_file
from derestainer.inference.folders import collect_inputs, translate_files
from derestainer.inference.loading import LoadedModel, export_model, load_model
from derestainer.inference.prediction import predict, translate_array
from derestainer.inference.slide_options import SlideOptions
from derestainer.inference.tiling import (
    BandBlender,
    TileGrid,
    axis_weights,
    grid_positions,
    raised_cosine_ramp,
)
from derestainer.inference.wsi import translate_slide

__all__ = [
    "BandBlender",
    "LoadedModel",
    "SlideOptions",
    "TileGrid",
    "axis_weights",
    "collect_inputs",
    "export_model",
    "grid_positions",
    "load_model",
    "predict",
    "raised_cosine_ramp",
    "resolve_device",
    "resolve_generator_file",
    "translate_array",
    "translate_files",
    "translate_slide",
]

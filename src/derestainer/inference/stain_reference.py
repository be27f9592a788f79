"""The training data's stain, recorded in an exported model file: the target of ``--normalize``.

:func:`stain_reference` summarises the tissue pixels of H&E images at the model's working
resolution: the Macenko H and E vectors with their 99th-percentile concentrations
(:func:`~derestainer.stain.normalize.macenko_source`), and the L*a*b* mean and standard deviation
(:func:`~derestainer.stain.normalize.lab_stats`). ``derestainer export`` computes it from the training
H&E (``--stain-reference``, by default the config's training split where it is on the machine) and stores it in the model file's metadata under ``"stain_reference"``;
:mod:`.normalize` then maps a slide's stain, and with it the amounts of stain, to the training data's.

Both sides are measured at the model's µm/px — training images resized to the training size,
slides read tile by tile at the model's resolution (:func:`slide_tissue_pixels`) — because stain
amounts depend on the scale: averaging pixels (a thumbnail) lowers the 99th-percentile
concentrations and the L*a*b* spread, and matching a thumbnail to full-resolution tiles would
over-stain.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from derestainer.core.config import Config
from derestainer.core.errors import DatasetError
from derestainer.core.io import list_images, read_image
from derestainer.data.datasets import build_dataset
from derestainer.inference.plan import SlidePlan, TileSelection, read_model_region
from derestainer.inference.slides import SlideReader
from derestainer.inference.tissue import tissue_mask
from derestainer.stain.normalize import lab_stats, macenko_source, rounded

#: Version of the record's layout.
REFERENCE_VERSION = 1
#: Images of a training folder used (evenly spread over its sorted file names), and tissue pixels kept.
MAX_IMAGES = 64
MAX_PIXELS = 400_000
#: Tiles of a slide read at the model's resolution to fit its normaliser (evenly spread over the tissue tiles).
SLIDE_TILES = 16


def tissue_pixels(images: Iterable[np.ndarray], mpp: float, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The tissue pixels ``uint8 [N, 3]`` of ``images`` (uint8 RGB at ``mpp`` µm/px, each a whole field:
    the pen-ink-aware :func:`~.tissue.tissue_mask`), at most ``max_pixels`` (:func:`sample_pixels`)."""
    return sample_pixels((img[tissue_mask(img, mpp)] for img in images), max_pixels)


def sample_pixels(parts: Iterable[np.ndarray], max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """At most ``max_pixels`` of the pixels ``[n_k, 3]`` of every part, the same number from each (a fixed
    seed: the same parts give the same pixels)."""
    kept = [p for p in parts if len(p)]
    if not kept:
        return np.zeros((0, 3), np.uint8)
    rng = np.random.default_rng(0)
    quota = max(1, max_pixels // len(kept))
    return np.concatenate([p if len(p) <= quota else p[np.sort(rng.choice(len(p), quota, replace=False))] for p in kept])


def stain_reference(pixels: np.ndarray, *, source: str, images: int, mpp: float) -> dict[str, Any]:
    """The stain record of tissue ``pixels`` (module docstring); ``macenko`` is None, with the reason in
    ``macenko_error``, when the tissue shows no two separable stains."""
    if len(pixels) == 0:
        raise DatasetError(f"{source}: no tissue found in {images} images to take the training stain from")
    mean, std = lab_stats(pixels)
    record: dict[str, Any] = {"version": REFERENCE_VERSION, "source": source, "images": images,
                              "tissue_pixels": len(pixels), "mpp": mpp,
                              "lab_mean": rounded(mean), "lab_std": rounded(std), "macenko": None}
    try:
        m, p = macenko_source(pixels)
    except ValueError as exc:
        record["macenko_error"] = str(exc)
    else:
        record["macenko"] = {"h": rounded(m[0]), "e": rounded(m[1]), "percentiles": rounded(p)}
    return record


def _evenly(n: int, k: int) -> np.ndarray:
    """Indices of ``k`` of ``n`` items evenly spread, first and last included (all of them when ``n ≤ k``)."""
    return np.arange(n) if n <= k else np.linspace(0, n - 1, k).round().astype(int)


def _resized(paths: list[Path], size: int) -> Iterator[np.ndarray]:
    for p in paths:
        img = read_image(p)
        if img.shape[:2] != (size, size):  # as the training loader sees it: the whole image at the training size
            img = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))
        yield img


def reference_from_files(paths: list[Path], *, source: str, size: int, mpp: float,
                         max_images: int = MAX_IMAGES) -> dict[str, Any]:
    """:func:`stain_reference` of up to ``max_images`` of the H&E images ``paths`` (evenly spread)
    resized to the training ``size`` (where they are ``mpp`` µm/px).

    Raises:
        DatasetError: no images, or no tissue in them.
        ImageReadError: an image that cannot be read (named).
    """
    ordered = sorted(paths)
    chosen = [ordered[i] for i in _evenly(len(ordered), max_images)]
    if not chosen:
        raise DatasetError(f"{source}: no images to take the training stain from")
    return stain_reference(tissue_pixels(_resized(chosen, size), mpp), source=source, images=len(chosen), mpp=mpp)


def reference_for_export(cfg: Config, given: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The stain reference ``export`` records: of the H&E images in folder ``given``; for ``"auto"``, of
    the training split of the config's dataset (``data``), None when it is not on this machine; None
    for ``"none"``. Measured at the config's training size and µm/px.

    Raises:
        DatasetError, ImageReadError: a given folder without images or tissue, an unreadable image.
    """
    if str(given) == "none":
        return None
    size, mpp = int(cfg.data.size), float(cfg.data.mpp)
    if str(given) == "auto":
        try:
            pairs = build_dataset(cfg.data, "train", train=False).pairs
        except (DatasetError, OSError):
            return None  # the training data is not here: nothing to measure
        if not pairs:
            return None
        name = Path(cfg.data.root).name if cfg.data.root else "training data"
        return reference_from_files([he for _, he, _ in pairs], source=f"{name} (training H&E, {len(pairs)} images)",
                                    size=size, mpp=mpp)
    folder = Path(given)
    if not folder.is_dir():
        raise DatasetError(f"--stain-reference {folder}: no such folder")
    files = list_images(folder)
    return reference_from_files(files, source=f"{folder.name} ({len(files)} images)", size=size, mpp=mpp)


def slide_tissue_pixels(reader: SlideReader, plan: SlidePlan, sel: TileSelection, n_tiles: int = SLIDE_TILES) -> np.ndarray:
    """Tissue pixels of up to ``n_tiles`` of the slide's tiles with tissue (evenly spread), read at the
    model's resolution as the model will see them (without normalisation); tissue is where the
    thumbnail's mask (:func:`~.plan.select_tiles`) says so (a tile is too small a field to mask alone)."""
    cells = np.argwhere(sel.run & (sel.frac > 0))
    cells = cells[_evenly(len(cells), n_tiles)]
    g, (th, tw) = plan.grid, sel.mask.shape

    def parts() -> Iterator[np.ndarray]:
        for i, j in cells:
            y0, x0 = int(g.ys[i]), int(g.xs[j])
            h, w = min(g.tile, plan.height - y0), min(g.tile, plan.width - x0)
            region = read_model_region(reader, plan, y0, x0, h, w)
            iy = np.minimum(((np.arange(y0, y0 + h) + 0.5) * th / plan.height).astype(int), th - 1)
            ix = np.minimum(((np.arange(x0, x0 + w) + 0.5) * tw / plan.width).astype(int), tw - 1)
            yield region[sel.mask[iy[:, None], ix[None, :]]]

    return sample_pixels(parts())


__all__ = ["MAX_IMAGES", "MAX_PIXELS", "REFERENCE_VERSION", "SLIDE_TILES", "reference_for_export", "reference_from_files",
           "sample_pixels", "slide_tissue_pixels", "stain_reference", "tissue_pixels"]

"""Floor rows: what a Table-1 score is worth without any model.

Two "predictions" made without training, scored like a model (docs/evaluation.md, "Floors"):

- ``median``: every test image filled with one colour, the per-channel median of all pixels of the
  *training* IHC — the best constant image for an L1 error, and about what a model that only learnt
  the background scores. The median is exact and memory-bounded: per-channel 256-bin histograms are
  accumulated over the images and the median read from the cumulative counts (the *lower* median:
  the smallest value v with at least ⌈N/2⌉ of the N pixels ≤ v).
- ``hematoxylin``: each test H&E's own haematoxylin re-rendered as an IHC counterstain without DAB:
  Ruifrok–Johnston deconvolution (:mod:`derestainer.stain`), the H concentration kept, eosin and
  DAB set to zero, recomposed with the same matrix. With the training H&E given, the H concentration
  is scaled by the ratio of the mean H concentration of the training IHC to that of the training H&E
  (IHC counterstains are usually paler); the factor is recorded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from derestainer.core.errors import EvaluationError
from derestainer.core.guard import output_lock, refuse_overlap, unfinished_until_done
from derestainer.core.io import check_images, list_images, read_image, write_image, write_json
from derestainer.stain.matrices import stain_index
from derestainer.stain.numpy_ops import hed_to_rgb_np, rgb_to_hed_np

#: The floors, in table order.
FLOOR_KINDS: tuple[str, ...] = ("median", "hematoxylin")

#: Version of how the floors are made (part of the benchmark's fingerprint of a floor row).
FLOOR_VERSION: int = 1

#: The record of a floor folder, written last.
FLOOR_RECORD = "floor.json"

#: Training images read to estimate the haematoxylin scale (the first ones by name).
SCALE_IMAGES: int = 64


def _images(folder: str | os.PathLike[str], what: str) -> list[Path]:
    files = list_images(folder) if Path(folder).is_dir() else []
    if not files:
        raise EvaluationError(f"{folder}: no {what} images (png, jpg, tif, ...) found")
    return files


def median_colour(ihc_train_dir: str | os.PathLike[str]) -> np.ndarray:
    """Per-channel lower median of all pixels of the images in ``ihc_train_dir``, ``uint8 [3]``."""
    hist = np.zeros((3, 256), dtype=np.int64)
    for f in _images(ihc_train_dir, "training IHC"):
        im = read_image(f)
        for c in range(3):
            hist[c] += np.bincount(im[..., c].ravel(), minlength=256)
    n = int(hist[0].sum())
    half = (n + 1) // 2  # ⌈N/2⌉
    return np.array([int(np.searchsorted(np.cumsum(h), half)) for h in hist], dtype=np.uint8)


def _mean_h(files: Sequence[Path]) -> float:
    h = stain_index("h")
    return float(np.mean([rgb_to_hed_np(read_image(f))[..., h].mean() for f in files[:SCALE_IMAGES]]))


def hematoxylin_scale(he_train_dir: str | os.PathLike[str], ihc_train_dir: str | os.PathLike[str]) -> float:
    """Mean H concentration of the training IHC over that of the training H&E (first :data:`SCALE_IMAGES` by name)."""
    he = _mean_h(_images(he_train_dir, "training H&E"))
    ihc = _mean_h(_images(ihc_train_dir, "training IHC"))
    return ihc / he if he > 0 else 1.0


def hematoxylin_image(he: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """The H&E's haematoxylin alone (times ``scale``), recomposed as ``uint8 [H, W, 3]``."""
    hed = rgb_to_hed_np(he)
    keep = np.zeros(3)
    keep[stain_index("h")] = scale
    return np.round(hed_to_rgb_np(hed * keep) * 255.0).astype(np.uint8)


def _floor_record(kind: str, he_dir: str | os.PathLike[str], n: int, ihc_train_dir: str | os.PathLike[str] | None,
                  he_train_dir: str | os.PathLike[str] | None) -> dict[str, Any]:
    """``floor.json``: what the floor is made of (its colour, or its haematoxylin scale) and from which folders."""
    record: dict[str, Any] = {"kind": kind, "he_dir": str(he_dir), "n_images": n,
                              "ihc_train_dir": None if ihc_train_dir is None else str(ihc_train_dir),
                              "he_train_dir": None if he_train_dir is None else str(he_train_dir)}
    if kind == "median":
        colour = median_colour(ihc_train_dir)  # type: ignore[arg-type]  # checked by write_floor
        record.update(colour=[int(c) for c in colour], method="per-channel lower median of all training IHC pixels")
    else:
        scale = (hematoxylin_scale(he_train_dir, ihc_train_dir)
                 if he_train_dir is not None and ihc_train_dir is not None else 1.0)
        record.update(h_scale=scale, method=("H&E haematoxylin (Ruifrok-Johnston, scikit-image matrix) times h_scale, "
                                             "eosin and DAB zero, recomposed"))
    return record


def write_floor(kind: str, he_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                ihc_train_dir: str | os.PathLike[str] | None = None,
                he_train_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Write the ``kind`` floor of every image of ``he_dir`` as ``out_dir/<stem>.png`` (the H&E's size), then
    ``floor.json``; returns that record.

    Raises:
        EvaluationError: unknown kind, missing training IHC for ``median``, a folder without images.
        OutputError: the output overlaps an input, is locked by another job, or cannot be written.
        ImageReadError: an unreadable input (named).
    """
    if kind not in FLOOR_KINDS:
        raise EvaluationError(f"unknown floor {kind!r}; choose one of {', '.join(FLOOR_KINDS)}")
    if kind == "median" and ihc_train_dir is None:
        raise EvaluationError("the median floor needs the training IHC (--ihc-train)")
    files = _images(he_dir, "H&E")
    out = Path(out_dir)
    inputs = [Path(he_dir), *(Path(d) for d in (ihc_train_dir, he_train_dir) if d is not None)]
    refuse_overlap(inputs, own_dirs=[out])
    sizes = check_images(files)
    with output_lock(out, folder=True):  # taken first (it creates the folder): a read-only --out fails before any work
        record = _floor_record(kind, he_dir, len(files), ihc_train_dir, he_train_dir)
        with unfinished_until_done(out / FLOOR_RECORD):
            for f, (w, h) in zip(files, sizes, strict=True):
                if kind == "median":
                    img = np.broadcast_to(np.asarray(record["colour"], dtype=np.uint8), (h, w, 3)).copy()
                else:
                    img = hematoxylin_image(read_image(f), record["h_scale"])
                write_image(out / f"{f.stem}.png", img)
            write_json(out / FLOOR_RECORD, record)
    return record


__all__ = ["FLOOR_KINDS", "FLOOR_RECORD", "FLOOR_VERSION", "hematoxylin_image", "hematoxylin_scale", "median_colour", "write_floor"]

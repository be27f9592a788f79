"""Colour measures used to calibrate SynthBCI against real images (``scripts/calibrate_synth.py``).

The measure: the median colour of *tissue* pixels (optical density summed over R, G, B above
``TISSUE_OD``, so glass is left out), per image, in CIELAB; a set of images is summarised by the
median of its per-image medians; two sets are compared by CIEDE2000 colour difference (ΔE00:
about 1 is just noticeable, 2–10 is perceptible at a glance, > 10 is a clearly different colour).
IHC pixels are further split into DAB-positive (Ruifrok DAB concentration above ``DAB_POSITIVE``)
and DAB-negative tissue (the counterstain and unstained tissue).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from skimage.color import deltaE_ciede2000, lab2rgb, rgb2lab

from derestainer.stain.numpy_ops import stain_concentration_np

#: Summed optical density (natural log, over R, G, B) above which a pixel is tissue.
TISSUE_OD: float = 0.3
#: Ruifrok DAB concentration (scikit-image units) above which an IHC pixel is DAB-positive
#: (about 0.55 natural-log OD along the DAB vector).
DAB_POSITIVE: float = 0.04


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean ``[H, W]``: pixels of a uint8 ``[H, W, 3]`` image darker than glass."""
    od = -np.log((np.asarray(rgb, dtype=np.float64) + 1.0) / 256.0)
    return od.sum(axis=-1) > TISSUE_OD


def dab_positive_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean ``[H, W]``: tissue pixels with Ruifrok DAB concentration above :data:`DAB_POSITIVE`."""
    return tissue_mask(rgb) & (stain_concentration_np(rgb, "dab") > DAB_POSITIVE)


def median_lab(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """Median CIELAB ``[3]`` of the masked pixels of a uint8 RGB image, or None if the mask is empty."""
    if not mask.any():
        return None
    px = np.asarray(rgb)[mask].astype(np.float64) / 255.0
    return np.median(rgb2lab(px[None]), axis=1)[0]


def lab_to_rgb8(lab: np.ndarray) -> list[int]:
    """CIELAB ``[3]`` → sRGB 0..255 (rounded), for reporting."""
    rgb = np.clip(lab2rgb(np.asarray(lab, dtype=np.float64)[None, None])[0, 0], 0, 1) * 255
    return [int(v) for v in np.rint(rgb)]


def summarise(images: Iterable[np.ndarray], which: str = "tissue") -> dict[str, Any]:
    """Median of per-image median tissue colours.

    Args:
        images: uint8 ``[H, W, 3]`` images.
        which: ``'tissue'``, ``'dab+'`` (DAB-positive tissue) or ``'dab-'`` (DAB-negative tissue).
    Returns:
        ``lab`` (median Lab), ``rgb`` (its sRGB), ``per_image`` (each image's median Lab, or None
        where it had no such pixels), ``n`` (images that had some).
    """
    per_image = []
    for im in images:
        t = tissue_mask(im)
        if which == "dab+":
            m = t & dab_positive_mask(im)
        elif which == "dab-":
            m = t & ~dab_positive_mask(im)
        elif which == "tissue":
            m = t
        else:
            raise ValueError(f"which must be 'tissue', 'dab+' or 'dab-', got {which!r}")
        per_image.append(median_lab(im, m))
    got = np.array([v for v in per_image if v is not None])
    if len(got) == 0:
        return {"lab": None, "rgb": None, "per_image": per_image, "n": 0}
    lab = np.median(got, axis=0)
    return {"lab": lab, "rgb": lab_to_rgb8(lab), "per_image": per_image, "n": len(got)}


def delta_e(lab1: np.ndarray, lab2: np.ndarray) -> float:
    """CIEDE2000 colour difference of two Lab colours."""
    return float(deltaE_ciede2000(np.asarray(lab1, dtype=np.float64), np.asarray(lab2, dtype=np.float64)))

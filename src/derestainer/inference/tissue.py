"""Tissue detection on a slide thumbnail: which tiles are worth running through the model.

Glass is bright and grey, stained tissue is coloured. The mask is

    saturation > clip(Otsu(saturation), lo, hi)   and   not near-black (scanner fill, out-of-scan areas)

followed by removal of specks and filling of small holes (sizes given in µm², converted with the
thumbnail's resolution). Otsu separates glass from tissue on a slide; clipping its threshold keeps
it sane on thumbnails that are all tissue (Otsu would split the tissue in two) or all glass.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max − min) / max`` of ``uint8 [H, W, 3]`` → float32 ``[H, W]`` in [0, 1] (0 where max = 0)."""
    a = rgb.astype(np.float32)
    mx = a.max(axis=-1)
    mn = a.min(axis=-1)
    return np.divide(mx - mn, mx, out=np.zeros_like(mx), where=mx > 0)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (``skimage.filters.threshold_otsu``; 0.5 if constant)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0 or v.min() == v.max():
        return 0.5
    return float(threshold_otsu(v, nbins=bins))


def remove_small(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """Drop 8-connected components of ``mask`` with fewer than ``min_pixels`` pixels."""
    if min_pixels <= 1 or not mask.any():
        return mask.copy()
    labels, n = ndi.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def fill_small_holes(mask: np.ndarray, max_pixels: int) -> np.ndarray:
    """Fill 4-connected background holes (not touching the border) of fewer than ``max_pixels`` pixels."""
    if max_pixels <= 0:
        return mask.copy()
    holes = ~mask
    labels, n = ndi.label(holes)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    small = sizes < max_pixels
    small[0] = False
    small[border] = False
    return mask | small[labels]


def tissue_mask(
    rgb: np.ndarray,
    mpp: float | None = None,
    *,
    sat_range: tuple[float, float] = (0.04, 0.15),
    dark_max: int = 30,
    min_object_um2: float = 5_000.0,
    max_hole_um2: float = 20_000.0,
    smooth_sigma: float = 1.0,
) -> np.ndarray:
    """Boolean tissue mask of a thumbnail.

    Args:
        rgb: thumbnail, ``uint8 [H, W, 3]``.
        mpp: microns per pixel of the thumbnail (to convert the µm² sizes); ``None`` → sizes in
            pixels are taken as 16 and 64 px.
        sat_range: Otsu's saturation threshold is clipped to this range.
        dark_max: pixels whose brightest channel is below this are background (black fill).
        min_object_um2: tissue fragments smaller than this are dropped (dust, specks).
        max_hole_um2: holes smaller than this are filled (lumina inside tissue are still tissue).
        smooth_sigma: Gaussian smoothing of the saturation (thumbnail pixels) before thresholding.

    Returns:
        bool ``[H, W]``.
    """
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"tissue_mask expects uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    sat = saturation(rgb)
    if smooth_sigma > 0:
        sat = ndi.gaussian_filter(sat, smooth_sigma)
    thr = float(np.clip(otsu_threshold(sat), *sat_range))
    mask = (sat > thr) & (rgb.max(axis=-1) >= dark_max)
    if mpp is not None and mpp > 0:
        min_obj = round(min_object_um2 / mpp**2)
        max_hole = round(max_hole_um2 / mpp**2)
    else:
        min_obj, max_hole = 16, 64
    mask = remove_small(mask, min_obj)
    return fill_small_holes(mask, max_hole)


def tile_tissue_fraction(mask: np.ndarray, boxes: np.ndarray, scale: float) -> np.ndarray:
    """Fraction of tissue in each box.

    Args:
        mask: bool ``[h, w]`` tissue mask of a thumbnail.
        boxes: int ``[n, 4]`` as ``(y0, x0, y1, x1)`` in the coordinates of the full image.
        scale: thumbnail pixels per full-image pixel (``h / H``).

    Returns:
        float64 ``[n]`` in [0, 1]; a box that maps to less than one thumbnail pixel takes the
        pixel it falls in. Parts of a box outside the image count as background.
    """
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0), axis=1)
    out = np.zeros(len(boxes), dtype=np.float64)
    for k, (y0, x0, y1, x1) in enumerate(np.asarray(boxes, dtype=np.float64)):
        ty0, tx0 = int(np.floor(y0 * scale)), int(np.floor(x0 * scale))
        ty1, tx1 = max(int(np.ceil(y1 * scale)), ty0 + 1), max(int(np.ceil(x1 * scale)), tx0 + 1)
        area = (ty1 - ty0) * (tx1 - tx0)
        cy0, cx0, cy1, cx1 = max(ty0, 0), max(tx0, 0), min(ty1, h), min(tx1, w)
        if cy1 <= cy0 or cx1 <= cx0:
            continue
        s = integral[cy1, cx1] - integral[cy0, cx1] - integral[cy1, cx0] + integral[cy0, cx0]
        out[k] = s / area
    return out

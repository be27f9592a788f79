"""Tissue detection on a slide thumbnail: which tiles are worth running through the model.

Glass is bright and grey, stained tissue is coloured. The mask is

    saturation > clip(Otsu(saturation), lo, hi)   and   not near-black (scanner fill, out-of-scan areas)
                                                   and   not pen ink (below)

followed by removal of specks and filling of small holes (sizes given in µm², converted with the
thumbnail's resolution). Otsu separates glass from tissue on a slide; clipping its threshold keeps
it sane on thumbnails that are all tissue (Otsu would split the tissue in two) or all glass.

**Pen ink** (:func:`ink_mask`). Marker drawn on the glass is as saturated as tissue, so saturation
alone takes it for tissue. Colour tells them apart: hematoxylin and eosin give pink to purple, HSV hue
about 240°–360° and 0°–20° (``skimage.color.rgb2hsv``), with red at least about as high as green;
even dense nuclear areas, dark blue-purple with blue highest, keep red ≳ green (hue ≥ ~240°). The
marker colours used on slides are not:

- *blue / green marker*: hue in [70°, 235°] with saturation ≥ 0.15. Blue ink (~(40, 60, 160),
  hue ≈ 230°) has blue ≫ red and green above red; green ink (~(40, 140, 70), hue ≈ 140°) has green
  above red and blue. The 235° edge leaves hematoxylin whose green exceeds red by less than 1/12 of
  its chroma, i.e. R ≈ G, as tissue; 70° leaves yellow-brown (pigment, bile) alone.
- *black marker*: dark and nearly grey, HSV value ≤ 0.35 and saturation < 0.30 (~(30, 30, 35)).
  Dark tissue (folds, dense nuclei) stays saturated purple: on the real H&E tiles of
  ``shared/data/real/he`` at most 0.02 % of the tissue pixels are that dark and grey.

Colour alone is not enough at full resolution: a blue-leaning hematoxylin (``torchstain_target``)
has single nuclei down to hue ~220°, and a scanner's colour fringes draw 1–2 px blue lines at nuclear
edges. So ink-coloured lines that thin (an opening with a 3 × 3 cross) and ink-coloured components
smaller than ``min_ink_um2`` (5,000 µm², as the smallest tissue fragment kept) are not ink: a pen
stroke is hundreds of µm wide. The ink mask is widened by ``2·smooth_sigma`` px (the smoothed
saturation and the anti-aliased edge of a stroke reach that far), taken out of the mask and left out
of Otsu's threshold.

Ink is removed *before* holes are filled, and again after. A pen ring drawn on the glass is then
neither tissue nor the wall of a hole: the glass it encloses joins the outside through the removed
ring, whatever its size. (Holes are filled up to ``max_hole_um2`` = 20,000 µm², a disc 160 µm
across, or 64 px when ``mpp`` is unknown: a mm-sized ring is beyond that, a small one was not.) An
ink dot inside tissue is not filled back in. Ink over tissue is judged by the colour the scanner saw: a nearly opaque stroke
(≳ 90 %) keeps the marker's hue and is removed; where the tissue shows through, blue over pink
turns violet, like hematoxylin, and stays tissue.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu
from skimage.morphology import disk


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


def ink_mask(
    rgb: np.ndarray,
    min_pixels: int = 16,
    *,
    ink_hue: tuple[float, float] = (70.0, 235.0),
    ink_min_saturation: float = 0.15,
    black_max_value: float = 0.35,
    black_max_saturation: float = 0.30,
) -> np.ndarray:
    """Blue, green and black pen ink in ``uint8 [H, W, 3]`` → bool ``[H, W]`` (the rules are in the module docstring).

    Args:
        rgb: image, ``uint8 [H, W, 3]``.
        min_pixels: ink-coloured 8-connected components smaller than this (after an opening with a
            3 × 3 cross, which drops lines 1–2 px thin) are not ink.
        ink_hue: HSV hue range in degrees of blue and green marker (with saturation ≥
            ``ink_min_saturation``).
        black_max_value, black_max_saturation: black marker has HSV value ≤ the first and saturation
            below the second.
    """
    sat, val = saturation(rgb), rgb.max(axis=-1) / 255.0  # HSV saturation and value
    black = (val <= black_max_value) & (sat < black_max_saturation)
    coloured = sat >= ink_min_saturation
    hue = rgb2hsv(rgb[coloured][None])[0, :, 0] * 360.0  # only where it counts: most of a slide is glass
    coloured[coloured] = (hue >= ink_hue[0]) & (hue <= ink_hue[1])
    strokes = ndi.binary_opening(coloured | black, structure=disk(1))  # drops 1–2 px fringes (chromatic aberration)
    return remove_small(strokes, min_pixels)


def tissue_mask(
    rgb: np.ndarray,
    mpp: float | None = None,
    *,
    sat_range: tuple[float, float] = (0.04, 0.15),
    dark_max: int = 30,
    min_object_um2: float = 5_000.0,
    max_hole_um2: float = 20_000.0,
    smooth_sigma: float = 1.0,
    reject_ink: bool = True,
    min_ink_um2: float = 5_000.0,
) -> np.ndarray:
    """Boolean tissue mask of a thumbnail.

    Args:
        rgb: thumbnail, ``uint8 [H, W, 3]``.
        mpp: microns per pixel of the thumbnail (to convert the µm² sizes); ``None`` → sizes in
            pixels are taken as 16 (objects, ink) and 64 px (holes).
        sat_range: Otsu's saturation threshold is clipped to this range.
        dark_max: pixels whose brightest channel is below this are background (black fill).
        min_object_um2: tissue fragments smaller than this are dropped (dust, specks).
        max_hole_um2: holes smaller than this are filled (lumina inside tissue are still tissue).
        smooth_sigma: Gaussian smoothing of the saturation (thumbnail pixels) before thresholding.
        reject_ink: take blue, green and black pen ink out of the mask (:func:`ink_mask`).
        min_ink_um2: ink-coloured areas smaller than this are not taken for ink.

    Returns:
        bool ``[H, W]``.
    """
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"tissue_mask expects uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    if mpp is not None and mpp > 0:
        min_obj, max_hole, min_ink = (round(a / mpp**2) for a in (min_object_um2, max_hole_um2, min_ink_um2))
    else:
        min_obj, max_hole, min_ink = 16, 64, 16
    ink = np.zeros(rgb.shape[:2], dtype=bool)
    if reject_ink:
        ink = ink_mask(rgb, min_ink)
    sat = saturation(rgb)
    if smooth_sigma > 0:
        sat = ndi.gaussian_filter(sat, smooth_sigma)
    thr = float(np.clip(otsu_threshold(sat[~ink]), *sat_range))
    mask = (sat > thr) & (rgb.max(axis=-1) >= dark_max)
    if ink.any():
        ink = ndi.binary_dilation(ink, structure=disk(max(1, int(np.ceil(2 * smooth_sigma)))))
        mask &= ~ink
    mask = remove_small(mask, min_obj)
    return fill_small_holes(mask, max_hole) & ~ink


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

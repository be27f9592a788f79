"""NumPy twins of :mod:`derestainer.stain.functional` on ``[H, W, 3]`` images (float in [0, 1] or uint8).

Used by data generation, metrics and command-line tools where no autograd is needed.
"""

from __future__ import annotations

import numpy as np

from derestainer.stain.matrices import EPS, HED_FROM_RGB, LOG_ADJUST, RGB_FROM_HED, stain_index


def _to_float(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim < 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [..., H, W, 3], got shape {rgb.shape}")
    if rgb.dtype == np.uint8:
        return rgb.astype(np.float64) / 255.0
    return rgb.astype(np.float64, copy=False)


def rgb_to_hed_np(rgb: np.ndarray, hed_from_rgb: np.ndarray | None = None) -> np.ndarray:
    """``T(rgb)`` on ``[..., H, W, 3]``; uint8 is scaled to [0, 1] first. Returns float64 HED ≥ 0."""
    m = HED_FROM_RGB if hed_from_rgb is None else np.asarray(hed_from_rgb, dtype=np.float64)
    od = np.log(np.maximum(_to_float(rgb), EPS)) / LOG_ADJUST
    return np.maximum(od @ m, 0.0)


def hed_to_rgb_np(hed: np.ndarray, rgb_from_hed: np.ndarray | None = None) -> np.ndarray:
    """``T⁻¹(hed)`` on ``[..., H, W, 3]``. Returns float64 RGB in [0, 1]."""
    m = RGB_FROM_HED if rgb_from_hed is None else np.asarray(rgb_from_hed, dtype=np.float64)
    return np.clip(np.exp((np.asarray(hed, dtype=np.float64) * LOG_ADJUST) @ m), 0.0, 1.0)


def stain_channel_np(rgb: np.ndarray, stain: str, rgb_from_hed: np.ndarray | None = None) -> np.ndarray:
    """Channel image of one stain, ``T⁻¹(T(rgb)·P_k)``, as float64 RGB in [0, 1]."""
    m = RGB_FROM_HED if rgb_from_hed is None else np.asarray(rgb_from_hed, dtype=np.float64)
    hed = rgb_to_hed_np(rgb, np.linalg.inv(m))
    keep = np.zeros(3)
    keep[stain_index(stain)] = 1.0
    return hed_to_rgb_np(hed * keep, m)


def stain_concentration_np(rgb: np.ndarray, stain: str, rgb_from_hed: np.ndarray | None = None) -> np.ndarray:
    """Concentration map ``[..., H, W]`` of one stain (HED coordinate, scikit-image units)."""
    m = None if rgb_from_hed is None else np.linalg.inv(np.asarray(rgb_from_hed, dtype=np.float64))
    return rgb_to_hed_np(rgb, m)[..., stain_index(stain)]


def macenko_stain_matrix(
    rgb: np.ndarray,
    second: str = "e",
    io: float = 240.0,
    beta: float = 0.15,
    alpha: float = 1.0,
) -> np.ndarray:
    """Per-image stain matrix by Macenko et al. (ISBI 2009), completed to 3×3.

    Optical densities of tissue pixels (OD > ``beta`` in every channel) are projected onto the
    plane of their two leading principal directions; the extreme angles (``alpha`` and
    ``100 - alpha`` percentiles) give the two stain vectors. The one with the larger red OD is
    haematoxylin (it absorbs red; eosin and DAB absorb little red). The third stain is their
    cross product.

    Args:
        rgb: ``[H, W, 3]`` uint8, or float in [0, 1] (scaled by 255).
        second: which stain the second vector is: ``'e'`` for H&E, ``'dab'`` for IHC.
        io: background (white) intensity in 0..255.
    Returns:
        ``[3, 3]`` ``rgb_from_hed`` with unit rows (H, E, DAB).
    Raises:
        ValueError: too few tissue pixels to estimate from.
    """
    x = np.asarray(rgb)
    x = x.astype(np.float64) if x.dtype == np.uint8 else np.asarray(x, dtype=np.float64) * 255.0
    od = -np.log((x.reshape(-1, 3) + 1.0) / io)
    od = od[np.all(od > beta, axis=1)]
    if od.shape[0] < 50:
        raise ValueError(f"Macenko estimation needs tissue: only {od.shape[0]} pixels above OD {beta}")
    _, vecs = np.linalg.eigh(np.cov(od, rowvar=False))
    plane = vecs[:, 1:3]  # two largest eigenvalues
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    v1 = v1 if v1.sum() >= 0 else -v1
    v2 = v2 if v2.sum() >= 0 else -v2
    h, other = (v1, v2) if v1[0] > v2[0] else (v2, v1)
    from derestainer.stain.matrices import stain_matrix_from_vectors

    if second.lower() == "dab":
        return stain_matrix_from_vectors(h=h, dab=other)
    if second.lower() == "e":
        return stain_matrix_from_vectors(h=h, e=other)
    raise ValueError(f"second stain must be 'e' or 'dab', got {second!r}")

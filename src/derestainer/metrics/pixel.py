"""SSIM and PSNR under the BCI protocol (docs/method.md, "Evaluation (§3.2)"), as pure functions on ``uint8 [H, W, 3]`` arrays.

The protocol, exactly:

1. the prediction is resized to the ground truth's size (:mod:`derestainer.core.resample`, the one
   place where that happens) with PIL's bicubic filter (``Image.BICUBIC``,
   Keys cubic with a = -0.5; when *down*-sizing PIL widens the kernel, i.e. antialiases) and kept
   uint8 RGB — the generated 512 px BCI images are scaled up to the 1024 px ground truth;
2. ``skimage.metrics.structural_similarity(gt, pred, channel_axis=-1, data_range=255)``: 7×7 uniform
   window, sample covariance, K1 = 0.01, K2 = 0.03, the SSIM map averaged over the valid region
   (a 3 px border is dropped) per channel, then over the three channels;
3. ``skimage.metrics.peak_signal_noise_ratio(gt, pred, data_range=255)``: ``10·log10(255² / MSE)``
   with the MSE over all pixels and channels — ``inf`` for identical images.

scikit-image itself computes the numbers (no re-implementation): NumPy and torch rewrites were
timed on 1024 px images and were at best ~1.4× faster than scikit-image's separable box filters,
not enough to justify a second SSIM to trust, so speed comes from running images in parallel
processes instead (:mod:`derestainer.evaluation.pool`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from derestainer.core.resample import ASPECT_TOLERANCE, DEFAULT_FILTER, describe, resize_rgb

__all__ = ["ASPECT_TOLERANCE", "RESIZE_METHOD", "pixel_metrics", "psnr", "resize_to", "ssim", "summarize"]

#: How predictions are brought to the ground truth's size by default (the filter is an option:
#: :func:`resize_to`, ``derestainer evaluate --resize-filter``; the report records the one applied).
RESIZE_METHOD: str = describe(DEFAULT_FILTER) + ", to the ground truth's size"

def _check_rgb_uint8(image: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 RGB [H, W, 3], got {a.dtype} {a.shape}")
    return a


def resize_to(image: np.ndarray, size_hw: tuple[int, int], filter: str = DEFAULT_FILTER) -> np.ndarray:
    """Resize ``uint8 [h, w, 3]`` to ``size_hw = (H, W)`` (:func:`derestainer.core.resample.resize_rgb`,
    PIL ``filter``, bicubic by default); returned unchanged if already that size.

    Raises:
        ValueError: the aspect ratios differ by more than :data:`ASPECT_TOLERANCE` (a resize
            would distort the image: the pair is probably wrong).
    """
    return resize_rgb(_check_rgb_uint8(image, "image"), size_hw, filter)


def ssim(gt: np.ndarray, pred: np.ndarray) -> float:
    """BCI-protocol SSIM of two same-size ``uint8 [H, W, 3]`` images (scikit-image; 1.0 when identical)."""
    g, p = _check_rgb_uint8(gt, "ground truth"), _check_rgb_uint8(pred, "prediction")
    if g.shape != p.shape:
        raise ValueError(f"shapes differ: ground truth {g.shape}, prediction {p.shape}; resize first (resize_to)")
    return float(structural_similarity(g, p, channel_axis=-1, data_range=255))


def psnr(gt: np.ndarray, pred: np.ndarray) -> float:
    """BCI-protocol PSNR in dB of two same-size ``uint8 [H, W, 3]`` images; ``inf`` when identical."""
    g, p = _check_rgb_uint8(gt, "ground truth"), _check_rgb_uint8(pred, "prediction")
    if g.shape != p.shape:
        raise ValueError(f"shapes differ: ground truth {g.shape}, prediction {p.shape}; resize first (resize_to)")
    if np.array_equal(g, p):
        # scikit-image divides by a zero MSE (a RuntimeWarning) and returns inf; say it without the warning.
        return math.inf
    return float(peak_signal_noise_ratio(g, p, data_range=255))


def pixel_metrics(gt: np.ndarray, pred: np.ndarray, filter: str = DEFAULT_FILTER) -> dict[str, float]:
    """Resize ``pred`` to ``gt``'s size (``filter``), then ``{'ssim': ..., 'psnr': ...}`` (BCI protocol)."""
    g = _check_rgb_uint8(gt, "ground truth")
    p = resize_to(pred, g.shape[:2], filter)
    return {"ssim": ssim(g, p), "psnr": psnr(g, p)}


def summarize(values: Iterable[float]) -> dict[str, float | int | None]:
    """Mean, standard deviation, median, min and max over the *finite* values, and how many were not.

    PSNR is ``inf`` for a pixel-identical pair; one such image would make a plain mean ``inf``.
    The reported mean is therefore over finite values only, and ``n_inf`` counts the infinite ones
    (``n_nan`` the undefined ones) so that nothing is hidden. Statistics of an empty set are ``None``.
    """
    v = np.asarray(list(values), dtype=np.float64)
    finite = v[np.isfinite(v)]
    out: dict[str, float | int | None] = {
        "n": int(v.size),
        "n_finite": int(finite.size),
        "n_inf": int(np.isinf(v).sum()),
        "n_nan": int(np.isnan(v).sum()),
    }
    if finite.size:
        out.update(mean=float(finite.mean()), std=float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
                   median=float(np.median(finite)), min=float(finite.min()), max=float(finite.max()))
    else:
        out.update(mean=None, std=None, median=None, min=None, max=None)
    return out

"""Bootstrap confidence intervals for per-image metrics, and paired differences between models.

Every Table-1 number is a statistic of per-image values: a mean (SSIM, PSNR, a top-k hit, a correct
kNN vote) or a correlation over images (DAB r). Its uncertainty from the choice of test images is
estimated by the **percentile bootstrap**: draw the test images with replacement ``B`` times (seeded),
recompute the statistic on each draw, and report the ``(1 − c)/2`` and ``(1 + c)/2`` quantiles of the
``B`` replicates (``numpy.quantile``, linear interpolation) and their standard deviation (the
bootstrap standard error). The semantic library (the ground-truth features) is held fixed: the
interval is about the sample of generated images scored against it.

Between two models the difference is **paired** by image: both are scored on the same resampled
images. When a model was trained with several seeds, the seeds are resampled too (two-level
bootstrap: seeds with replacement, then images with replacement, the statistic averaged over the
drawn seeds), so the interval covers training noise as well as test-set noise; a model with one
run (a floor row) contributes no seed noise. The smallest difference such a comparison could detect
(two-sided α = 0.05, power 0.8) is ``(z₀.₉₇₅ + z₀.₈) · SE ≈ 2.80 · SE``.

Hand-written, not scipy.stats.bootstrap: that function resamples one sample at a time and cannot
share one draw of images between many metrics and two models, nor resample seeds and images together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

#: A statistic over images: the mean of one per-image value, or Pearson's r of two.
Stat = Literal["mean", "pearson"]

#: ``z₀.₉₇₅ + z₀.₈₀``: a true difference of this many standard errors is detected with 80 % power.
DETECTABLE_Z: float = 1.959963984540054 + 0.8416212335729143


def resample_indices(n: int, b: int, seed: int) -> np.ndarray:
    """``[b, n]`` indices into ``n`` items drawn with replacement (``numpy`` PCG64 seeded by ``seed``)."""
    return np.random.default_rng(seed).integers(0, n, size=(b, n)) if n > 0 else np.zeros((b, 0), dtype=np.int64)


def _finite_mean(x: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the finite values only (NaN where none): as the reported PSNR mean."""
    ok = np.isfinite(x)
    s = np.where(ok, x, 0.0).sum(axis=-1)
    c = ok.sum(axis=-1)
    return np.divide(s, c, out=np.full(s.shape, np.nan), where=c > 0)


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r over the last axis (NaN where either side is constant)."""
    constant = (a.max(axis=-1) == a.min(axis=-1)) | (b.max(axis=-1) == b.min(axis=-1))
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    num = (a * b).sum(axis=-1)
    den = np.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1))
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=(den > 0) & ~constant)


def statistic(values: Sequence[np.ndarray], stat: Stat) -> np.ndarray:
    """The statistic over the last axis: ``mean`` of ``values[0]``, or ``pearson`` r of ``values[0]`` and ``values[1]``."""
    if stat == "mean":
        return _finite_mean(np.asarray(values[0], dtype=np.float64))
    if stat == "pearson":
        return _pearson(np.asarray(values[0], dtype=np.float64), np.asarray(values[1], dtype=np.float64))
    raise ValueError(f"unknown statistic {stat!r}")


def replicates(values: Sequence[np.ndarray], stat: Stat, idx: np.ndarray) -> np.ndarray:
    """The statistic on each resample: ``values`` are ``[n]`` arrays, ``idx`` is ``[b, n]`` → ``[b]``."""
    return statistic([np.asarray(v, dtype=np.float64)[idx] for v in values], stat)


def interval(reps: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of the finite replicates (NaN, NaN when there are none)."""
    r = np.asarray(reps, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(r, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return float(lo), float(hi)


def summary(estimate: float, reps: np.ndarray, confidence: float) -> dict[str, Any]:
    """``{'estimate', 'ci_low', 'ci_high', 'se', 'confidence', 'b'}`` from the replicates."""
    lo, hi = interval(reps, confidence)
    r = np.asarray(reps, dtype=np.float64)
    r = r[np.isfinite(r)]
    se = float(r.std(ddof=1)) if r.size > 1 else math.nan
    return {"estimate": float(estimate), "ci_low": lo, "ci_high": hi, "se": se,
            "confidence": float(confidence), "b": int(reps.size)}


def bootstrap_ci(values: Sequence[np.ndarray], stat: Stat, idx: np.ndarray, confidence: float = 0.95) -> dict[str, Any]:
    """The statistic on all images with its percentile bootstrap interval over the resamples ``idx``."""
    est = float(statistic([np.asarray(v, dtype=np.float64) for v in values], stat))
    return summary(est, replicates(values, stat, idx), confidence)


def _per_seed(values: Sequence[np.ndarray], stat: Stat, img_idx: np.ndarray) -> np.ndarray:
    """``values``: ``[S, n]`` arrays → the statistic per seed and image resample, ``[S, b]``."""
    return statistic([np.asarray(v, dtype=np.float64)[:, img_idx] for v in values], stat)


def two_level(values: Sequence[np.ndarray], stat: Stat, img_idx: np.ndarray, seed_idx: np.ndarray) -> np.ndarray:
    """Replicates ``[b]`` of the seed-averaged statistic: ``values`` are ``[S, n]``, ``img_idx`` ``[b, n]``
    (images drawn), ``seed_idx`` ``[b, S]`` (runs drawn); replicate j averages the statistic of the runs
    ``seed_idx[j]`` on the images ``img_idx[j]``."""
    per = _per_seed(values, stat, img_idx)  # [S, b]
    return per[seed_idx.T, np.arange(img_idx.shape[0])].mean(axis=0)


def _matrices(values: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.atleast_2d(np.asarray(v, dtype=np.float64)) for v in values]


def seed_image_interval(values: Sequence[np.ndarray], stat: Stat, b: int = 2000, seed: int = 0,
                        confidence: float = 0.95) -> dict[str, Any]:
    """The seed-averaged statistic of one model (``values``: ``[S, n]`` arrays) with its two-level interval."""
    v = _matrices(values)
    rng = np.random.default_rng(seed)
    n, s = v[0].shape[1], v[0].shape[0]
    reps = two_level(v, stat, rng.integers(0, n, size=(b, n)), rng.integers(0, s, size=(b, s)))
    return summary(float(np.mean(statistic(v, stat))), reps, confidence)


def paired_difference(
    model: Sequence[np.ndarray], reference: Sequence[np.ndarray], stat: Stat, b: int = 2000, seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """``model − reference`` for one metric, paired by image, seeds and images resampled together.

    Args:
        model, reference: the per-image values, each array ``[S, n]`` (S runs, n test images in the
            same order for both; S may differ between the two). One array for ``mean``, two
            (generated, real) for ``pearson``.
    Returns:
        :func:`summary` of the difference of the seed-averaged statistics, plus ``detectable``
        (:data:`DETECTABLE_Z` · SE) and ``excludes_zero``.
    """
    m, r = _matrices(model), _matrices(reference)
    n = m[0].shape[1]
    if any(v.shape[1] != n for v in (*m, *r)):
        raise ValueError("both models must be scored on the same test images")
    if stat == "mean":  # an image non-finite for either model (PSNR inf) leaves both: the means stay paired
        both = np.isfinite(m[0]).all(axis=0) & np.isfinite(r[0]).all(axis=0)
        m, r = [np.where(both, m[0], np.nan)], [np.where(both, r[0], np.nan)]
    rng = np.random.default_rng(seed)
    img_idx = rng.integers(0, n, size=(b, n))  # the same images for both: paired
    rep_m = two_level(m, stat, img_idx, rng.integers(0, m[0].shape[0], size=(b, m[0].shape[0])))
    rep_r = two_level(r, stat, img_idx, rng.integers(0, r[0].shape[0], size=(b, r[0].shape[0])))
    est = float(np.mean(statistic(m, stat)) - np.mean(statistic(r, stat)))
    out = summary(est, rep_m - rep_r, confidence)
    out["detectable"] = DETECTABLE_Z * out["se"] if math.isfinite(out["se"]) else math.nan
    out["excludes_zero"] = bool(out["ci_low"] > 0 or out["ci_high"] < 0)
    return out


__all__ = ["DETECTABLE_Z", "Stat", "bootstrap_ci", "interval", "paired_difference", "replicates", "resample_indices",
           "seed_image_interval", "statistic", "summary", "two_level"]

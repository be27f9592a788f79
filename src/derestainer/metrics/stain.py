"""Stain-aware metrics (beyond the paper): does the generated IHC carry the right amount of DAB and haematoxylin?

Per image, from Ruifrok–Johnston colour deconvolution (:mod:`derestainer.stain`, the same matrix
as scikit-image's ``rgb2hed``):

- **mean optical density** of a stain: the mean over *all* pixels (background counts as 0) of its
  concentration expressed in decadic OD units along its stain vector. scikit-image's HED
  coordinates are ``log(rgb)/log(1e-6) @ hed_from_rgb = OD₁₀/6 @ hed_from_rgb`` (because
  ``log10(1e-6) = -6``), so ``OD = 6 · c``: a value of 1 means the stain alone would attenuate
  light 10-fold;
- **positive area fraction**: the fraction of pixels whose stain OD exceeds a threshold,
  :data:`DAB_THRESHOLD` for DAB and :data:`H_THRESHOLD` for haematoxylin (0.15 OD₁₀, in the valley
  between unstained and stained pixels of the real IHC image in the shared test data, and of the
  order of QuPath's default DAB thresholds, which use the same decadic OD).

Across images, generated vs real: Pearson r, mean absolute error, and the per-HER2-level means.
Everything is a pure NumPy function.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from derestainer.core.levels import HER2_LEVELS
from derestainer.stain.matrices import LOG_ADJUST
from derestainer.stain.numpy_ops import rgb_to_hed_np

#: Multiplier from scikit-image HED coordinates to decadic optical density: ``-log10(1e-6) = 6``.
OD_SCALE: float = float(-LOG_ADJUST / np.log(10.0))
#: DAB-positive pixel: DAB OD₁₀ above this.
DAB_THRESHOLD: float = 0.15
#: Haematoxylin-positive pixel: H OD₁₀ above this.
H_THRESHOLD: float = 0.15

#: Per-image statistics returned by :func:`stain_stats`, in order.
STAT_NAMES: tuple[str, ...] = ("dab_od", "dab_fraction", "h_od", "h_fraction")


def stain_od(rgb: np.ndarray) -> np.ndarray:
    """Decadic optical density of H, E and DAB per pixel. ``[H, W, 3]`` uint8 (or float in [0, 1]) → float64 ``[H, W, 3]`` ≥ 0."""
    return rgb_to_hed_np(rgb) * OD_SCALE


def stain_stats(
    rgb: np.ndarray, dab_threshold: float = DAB_THRESHOLD, h_threshold: float = H_THRESHOLD
) -> dict[str, float]:
    """Mean DAB and H optical density and positive area fractions of one image.

    Args:
        rgb: ``[H, W, 3]`` uint8 (or float in [0, 1]).
    Returns:
        ``{'dab_od', 'dab_fraction', 'h_od', 'h_fraction'}`` (see the module docstring).
    """
    od = stain_od(rgb)
    h, dab = od[..., 0], od[..., 2]
    return {
        "dab_od": float(dab.mean()),
        "dab_fraction": float((dab > dab_threshold).mean()),
        "h_od": float(h.mean()),
        "h_fraction": float((h > h_threshold).mean()),
    }


def pearson_r(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two 1-D arrays; NaN when fewer than 2 values or either is constant (undefined)."""
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"pearson_r needs equal lengths, got {x.size} and {y.size}")
    if x.size < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    den = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    if den == 0.0:
        return float("nan")
    return float(np.clip((dx * dy).sum() / den, -1.0, 1.0))


def agreement(
    generated: Sequence[float] | np.ndarray,
    real: Sequence[float] | np.ndarray,
    levels: Sequence[int] | np.ndarray | None = None,
    n_levels: int = 4,
) -> dict[str, object]:
    """How well a per-image quantity of the generated images follows the real ones.

    Args:
        generated, real: ``[N]`` values, image i of one paired with image i of the other.
        levels: ``[N]`` HER2 level (0..n_levels-1; -1 or None = unknown) of each pair, for the breakdown.
    Returns:
        ``{'pearson_r', 'mae', 'mean_generated', 'mean_real', 'per_level': {'0': {'n', 'generated', 'real', 'mae'}, ...}}``;
        undefined values are NaN (e.g. r of constant data), empty levels are omitted.
    """
    g, r = np.asarray(generated, dtype=np.float64).ravel(), np.asarray(real, dtype=np.float64).ravel()
    if g.shape != r.shape:
        raise ValueError(f"generated and real must pair up: {g.size} vs {r.size} values")
    out: dict[str, object] = {
        "pearson_r": pearson_r(g, r),
        "mae": float(np.abs(g - r).mean()) if g.size else float("nan"),
        "mean_generated": float(g.mean()) if g.size else float("nan"),
        "mean_real": float(r.mean()) if r.size else float("nan"),
    }
    if levels is not None:
        lv = np.asarray(levels, dtype=np.int64).ravel()
        if lv.shape != g.shape:
            raise ValueError(f"levels must pair up with the values: {lv.size} vs {g.size}")
        per: dict[str, dict[str, float | int]] = {}
        for k in range(n_levels):
            m = lv == k
            if m.any():
                name = HER2_LEVELS[k] if k < len(HER2_LEVELS) else str(k)
                per[name] = {"n": int(m.sum()), "generated": float(g[m].mean()), "real": float(r[m].mean()),
                             "mae": float(np.abs(g[m] - r[m]).mean())}
        out["per_level"] = per
    return out

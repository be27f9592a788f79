"""Stain normalisation: bring an H&E image from another scanner or lab to a target stain (NumPy, uint8 RGB).

A :class:`StainNormalizer` is fitted once (on a slide's tissue pixels, :func:`fit_macenko` /
:func:`fit_reinhard`) and is then a *pixel-wise* function ``uint8 [..., 3] → uint8 [..., 3]``: no
statistic is taken from the image it is applied to, so overlapping tiles of one slide get identical
pixels where they overlap and blending stays seamless.

- **macenko** (Macenko et al., ISBI 2009): the source's H and E vectors are estimated by
  :func:`~derestainer.stain.numpy_ops.macenko_stain_matrix` (completed to 3×3 by their cross product,
  the residual direction). Each pixel's optical density ``od`` (scikit-image's units,
  :data:`~derestainer.stain.matrices.LOG_ADJUST`) becomes concentrations ``c = od · M_src⁻¹``; H and E
  are scaled by ``p_target / p_src`` (99th percentiles on tissue; 1 when the target records none)
  and re-rendered with the target's matrix by Beer–Lambert, ``rgb = exp(LOG_ADJUST · c · M_tgt)``
  (:func:`~derestainer.stain.numpy_ops.hed_to_rgb_np`). The residual keeps its amount and goes to the
  target's residual direction, so the map is the identity when source and target agree, and nothing
  off the H–E plane (noise, ink) is thrown away. Concentrations are not clipped: the map is linear in
  OD. Glass (OD ≈ 0) stays white: ``exp(0) = 1``.
- **reinhard** (Reinhard et al., 2001): per-channel mean/std matching in CIE-L*a*b*
  (``skimage.color.rgb2lab`` / ``lab2rgb``), fitted on tissue; it moves glass too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from skimage.color import lab2rgb, rgb2lab

from derestainer.stain.matrices import LOG_ADJUST, stain_matrix_from_vectors
from derestainer.stain.numpy_ops import macenko_stain_matrix, rgb_to_hed_np

#: ``--normalize``: the methods, ``none`` leaving images as they are.
NormalizeMethod = Literal["none", "macenko", "reinhard"]
NORMALIZE_METHODS: tuple[str, ...] = ("none", "macenko", "reinhard")
#: Percentile of the tissue concentrations that are matched (Macenko et al.).
PERCENTILE = 99.0
#: Smallest angle (degrees) between fitted H and E vectors: below it the tissue's optical densities did not
#: span two stains (e.g. pale eosin, whose red OD falls below Macenko's β in every channel, left out of the
#: fit) and the "vectors" are two directions of one cluster; mapping with them would distort the colours.
#: Real H&E gives 17–38° (the images of ../shared/data/real/he), degenerate fits under 2°.
MIN_STAIN_ANGLE = 10.0
#: Digits kept in the record; the map is built from the rounded values, so the record reproduces it.
DIGITS = 6

#: Optical density of each uint8 value, in scikit-image's units (the package's own conversion).
OD_LUT: np.ndarray = rgb_to_hed_np(np.arange(256, dtype=np.uint8).reshape(1, 256, 1).repeat(3, axis=2),
                                   np.eye(3))[0, :, 0]


def _pixels(rgb: np.ndarray) -> np.ndarray:
    x = np.asarray(rgb)
    if x.dtype != np.uint8 or x.ndim < 2 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB pixels [..., 3], got {x.dtype} of shape {x.shape}")
    return x.reshape(-1, 3)


def rounded(a: Any) -> list[Any]:
    """``a`` as nested lists of floats to :data:`DIGITS` decimals (what records keep)."""
    return np.round(np.asarray(a, dtype=np.float64), DIGITS).tolist()


@dataclass(frozen=True, eq=False)
class StainNormalizer:
    """A fitted, pixel-wise stain normaliser (module docstring); ``record``: JSON of how it was fitted.

    ``params``: macenko, the ``[3, 3]`` map of optical densities ``od_out = od · params``;
    reinhard, ``[2, 3]`` L*a*b* ``scale`` and ``shift``.
    """

    method: Literal["macenko", "reinhard"]
    params: np.ndarray = field(repr=False)
    record: dict[str, Any] = field(default_factory=dict)
    _lut: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.method == "macenko":
            # Beer–Lambert is separable: out_j = Π_i exp(LOG_ADJUST · od(v_i) · T_ij), one 256-entry table
            # per (input, output) channel. Hand-written instead of hed_to_rgb_np's matrix product so that a
            # pixel's result cannot depend on the shape of the array it sits in (BLAS blocking): equal to
            # it to float rounding (tests/test_normalize.py), exact across tiles, and a few times faster.
            # (exponents bounded so that no product of three overflows; beyond ±200 it is black or white anyway)
            expo = np.clip(LOG_ADJUST * OD_LUT[:, None, None] * np.asarray(self.params)[None], -200.0, 200.0)
            object.__setattr__(self, "_lut", np.exp(expo))  # [256 values, 3 in, 3 out]

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 RGB ``[..., 3]`` → normalised uint8 RGB of the same shape."""
        x = np.asarray(rgb)
        _pixels(x)
        if self.method == "macenko":
            lut = self._lut
            out = lut[x[..., 0], 0] * lut[x[..., 1], 1] * lut[x[..., 2], 2]
        else:
            with warnings.catch_warnings():  # out-of-gamut colours are clipped, as they must be
                warnings.simplefilter("ignore")
                out = lab2rgb(rgb2lab(x) * self.params[0] + self.params[1])
        return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def tissue_concentrations(tissue_rgb: np.ndarray, rgb_from_hed: np.ndarray) -> np.ndarray:
    """Stain concentrations ``[N, 3]`` of uint8 pixels under ``rgb_from_hed``, not clipped at 0 (linear in OD)."""
    return OD_LUT[_pixels(tissue_rgb)] @ np.linalg.inv(rgb_from_hed)


def stain_percentiles(tissue_rgb: np.ndarray, rgb_from_hed: np.ndarray, q: float = PERCENTILE) -> np.ndarray:
    """The ``q``-th percentiles of the H and E concentrations of ``tissue_rgb`` (``[2]``)."""
    return np.percentile(tissue_concentrations(tissue_rgb, rgb_from_hed)[:, :2], q, axis=0)


def macenko_source(tissue_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rgb_from_hed [3, 3] by Macenko with unit rows H, E, residual; 99th-percentile H, E concentrations [2])``.

    Raises:
        ValueError: too little tissue, H and E less than :data:`MIN_STAIN_ANGLE` apart, or percentiles that
            are not positive (no stain to scale).
    """
    px = _pixels(tissue_rgb)
    m = macenko_stain_matrix(px[:, None, :], second="e")
    angle = float(np.degrees(np.arccos(np.clip(m[0] @ m[1], -1.0, 1.0))))
    if angle < MIN_STAIN_ANGLE:
        raise ValueError(f"the fitted H and E stain vectors are only {angle:.1f}° apart (< {MIN_STAIN_ANGLE:g}°): "
                         f"the tissue does not show two separable stains")
    p = stain_percentiles(px, m)
    if not np.all(p > 0):
        raise ValueError(f"the tissue's {PERCENTILE:g}th-percentile stain concentrations are not positive ({p})")
    return m, p


def fit_macenko(tissue_rgb: np.ndarray, target_rgb_from_hed: np.ndarray, target_percentiles: np.ndarray | None = None,
                *, target: str = "given") -> StainNormalizer:
    """Macenko normaliser from ``tissue_rgb`` (uint8 ``[..., 3]`` tissue pixels) to a target stain.

    Args:
        target_rgb_from_hed: the target's matrix; its H and E rows are used (normalised, residual = their
            cross product, as for the source). target_percentiles: the target's 99th-percentile H and E
            concentrations (:func:`stain_percentiles`); None keeps the source's amounts of stain.
        target: where the target came from, for the record.
    Raises:
        ValueError: too little tissue to estimate from (:func:`macenko_source`).
    """
    src, p_src = macenko_source(tissue_rgb)
    tgt = np.asarray(target_rgb_from_hed, dtype=np.float64)
    rec: dict[str, Any] = {
        "method": "macenko", "target": target, "percentile": PERCENTILE,
        "target_stain_vectors": {"h": rounded(tgt[0] / np.linalg.norm(tgt[0])),
                                 "e": rounded(tgt[1] / np.linalg.norm(tgt[1]))},
        "target_percentiles": None if target_percentiles is None else rounded(target_percentiles),
        "slide_stain_vectors": {"h": rounded(src[0]), "e": rounded(src[1])},
        "slide_percentiles": rounded(p_src),
        "tissue_pixels": int(_pixels(tissue_rgb).shape[0]),
    }
    return macenko_from_record(rec)


def macenko_from_record(rec: dict[str, Any]) -> StainNormalizer:
    """The Macenko normaliser a record of :func:`fit_macenko` describes (built from its rounded values)."""
    src = stain_matrix_from_vectors(h=rec["slide_stain_vectors"]["h"], e=rec["slide_stain_vectors"]["e"])
    tgt = stain_matrix_from_vectors(h=rec["target_stain_vectors"]["h"], e=rec["target_stain_vectors"]["e"])
    scale = np.ones(3)
    if rec.get("target_percentiles") is not None:
        scale[:2] = np.asarray(rec["target_percentiles"], dtype=np.float64) / np.asarray(rec["slide_percentiles"])
    rec = {**rec, "scale": rounded(scale[:2])}
    return StainNormalizer("macenko", np.linalg.inv(src) @ np.diag(scale) @ tgt, rec)


def lab_stats(tissue_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation ``([3], [3])`` of the L*a*b* values of uint8 pixels."""
    lab = rgb2lab(_pixels(tissue_rgb)[:, None, :])[:, 0]
    return lab.mean(axis=0), lab.std(axis=0)


def fit_reinhard(tissue_rgb: np.ndarray, target_mean: np.ndarray, target_std: np.ndarray,
                 *, target: str = "given") -> StainNormalizer:
    """Reinhard normaliser: ``lab' = (lab − μ_src) · σ_tgt / σ_src + μ_tgt`` per channel, μ/σ of ``tissue_rgb``.

    Raises:
        ValueError: a channel of the tissue has no spread (σ = 0).
    """
    mu, sd = lab_stats(tissue_rgb)
    if not np.all(sd > 0):
        raise ValueError(f"the tissue's L*a*b* channels must vary; standard deviations {sd}")
    t_mu, t_sd = np.asarray(target_mean, dtype=np.float64), np.asarray(target_std, dtype=np.float64)
    scale = t_sd / sd
    rec = {"method": "reinhard", "target": target, "target_lab_mean": rounded(t_mu), "target_lab_std": rounded(t_sd),
           "slide_lab_mean": rounded(mu), "slide_lab_std": rounded(sd), "tissue_pixels": int(_pixels(tissue_rgb).shape[0])}
    return StainNormalizer("reinhard", np.stack([scale, t_mu - mu * scale]), rec)


__all__ = ["MIN_STAIN_ANGLE", "NORMALIZE_METHODS", "OD_LUT", "PERCENTILE", "NormalizeMethod", "StainNormalizer", "fit_macenko",
           "fit_reinhard", "lab_stats", "macenko_from_record", "macenko_source", "rounded", "stain_percentiles",
           "tissue_concentrations"]

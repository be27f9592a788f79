"""Fréchet and kernel inception distances, computed on the *evaluator's* features (not Inception's).

No Inception network can be downloaded here, and an ImageNet network says little about HER2
staining; the evaluator classifier trained on IHC is the feature extractor instead. Numbers are
therefore comparable only between runs that use the same evaluator checkpoint (reports name it).

- **FID** (Heusel et al., 2017): fit a Gaussian to each feature set (mean, unbiased covariance)
  and take ``‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½)``, the matrix square root by
  ``scipy.linalg.sqrtm``. Biased upwards for small sets, and the covariance is singular when
  there are fewer images than feature dimensions (977 BCI test images, 2048 ResNet-50 features):
  compare FIDs only at equal set sizes.
- **KID** (Bińkowski et al., 2018): the unbiased estimate of the squared maximum mean discrepancy
  with the cubic polynomial kernel ``k(x, y) = (xᵀy / D + 1)³``, averaged over random subsets of
  equal size drawn without replacement (as torch-fidelity and clean-fid do); mean and standard
  deviation over subsets are reported (when both sets are no larger than the subset size, the
  whole sets are compared once and the std is ``None``). Unbiased: its expectation is 0 for equal distributions
  (single subsets may be negative).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` of ``[N, D]`` features (N ≥ 2)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    ``‖μ₁ − μ₂‖² + Tr(Σ₁) + Tr(Σ₂) − 2 Tr((Σ₁Σ₂)^½)``. When the product is singular enough for
    ``sqrtm`` to fail (non-finite result), ``eps·I`` is added to both covariances, as pytorch-fid
    does; a small imaginary part from round-off is dropped, a large one is an error.
    """
    m1, m2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64)), np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if m1.shape != m2.shape or s1.shape != s2.shape or s1.shape != (m1.size, m1.size):
        raise ValueError(f"mismatched shapes: mu {m1.shape}/{m2.shape}, sigma {s1.shape}/{s2.shape}")
    diff = m1 - m2
    with warnings.catch_warnings():  # a singular product (e.g. one image repeated) is handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.all(np.isfinite(covmean)):
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        scale = max(1.0, np.abs(np.diagonal(covmean).real).max())
        if imag > 1e-3 * scale:
            raise ValueError(f"matrix square root has a large imaginary component ({imag:.3g}); covariances are ill-conditioned")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets ``[N_a, D]`` and ``[N_b, D]`` (each N ≥ 2)."""
    mu1, s1 = feature_statistics(features_a)
    mu2, s2 = feature_statistics(features_b)
    return frechet_distance(mu1, s1, mu2, s2)


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> np.ndarray:
    """``(gamma · x yᵀ + coef0)^degree``, gamma = 1/D by default. ``[N, D]``, ``[M, D]`` → ``[N, M]``."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    g = 1.0 / a.shape[1] if gamma is None else float(gamma)
    return (g * (a @ b.T) + coef0) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    """Unbiased MMD² from kernel matrices of two equal-size samples (m ≥ 2): within-set means skip the diagonal."""
    m = k_xx.shape[0]
    if m < 2 or k_yy.shape != (m, m) or k_xy.shape != (m, m):
        raise ValueError("mmd2_unbiased needs square kernel matrices of one size m >= 2")
    sxx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    syy = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(sxx + syy - 2.0 * k_xy.mean())


def kid(
    features_a: np.ndarray,
    features_b: np.ndarray,
    n_subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 0,
) -> dict[str, float | int]:
    """KID between two feature sets: mean and std of the unbiased MMD² over random subsets.

    The subset size is ``min(subset_size, N_a, N_b)``; each subset is drawn without replacement.
    When that size equals both set sizes every "subset" would be the whole set reordered (and
    MMD² is order-invariant), so the estimate is computed once: ``n_subsets`` is then 1 and
    ``std`` is ``None`` (no spread to report; JSON null). ``std`` is likewise ``None`` whenever
    only one subset was drawn. Returns ``{'mean', 'std', 'subset_size', 'n_subsets',
    'n_subsets_requested'}`` with the *effective* subset size and count.
    """
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need features [N, D] of one D, got {a.shape} and {b.shape}")
    m = min(int(subset_size), a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 images in each set, got {a.shape[0]} and {b.shape[0]}")
    if int(n_subsets) < 1:
        raise ValueError(f"n_subsets must be >= 1, got {n_subsets}")
    whole = m == a.shape[0] and m == b.shape[0]
    n_eff = 1 if whole else int(n_subsets)
    rng = np.random.default_rng(seed)
    vals = np.empty(n_eff, dtype=np.float64)
    for i in range(n_eff):
        if whole:
            x, y = a, b
        else:
            x = a[rng.choice(a.shape[0], m, replace=False)]
            y = b[rng.choice(b.shape[0], m, replace=False)]
        vals[i] = mmd2_unbiased(
            polynomial_kernel(x, x, degree, gamma, coef0),
            polynomial_kernel(y, y, degree, gamma, coef0),
            polynomial_kernel(x, y, degree, gamma, coef0),
        )
    return {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if vals.size > 1 else None,
            "subset_size": m, "n_subsets": n_eff, "n_subsets_requested": int(n_subsets)}

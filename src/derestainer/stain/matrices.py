"""Stain matrices and their sources.

Each matrix has one stain per *row*, each row the optical-density (OD) colour of that stain in
R, G, B.  Following scikit-image the names read as matrix products on row vectors:
``od_rgb = hed @ rgb_from_hed`` and ``hed = od_rgb @ hed_from_rgb``.
"""

from __future__ import annotations

import numpy as np

#: Ruifrok & Johnston (2001), Table 1, exactly as scikit-image's ``skimage.color.rgb_from_hed``
#: (rows are *not* renormalised, so results match ``rgb2hed``/``hed2rgb`` bit for bit).
RGB_FROM_HED: np.ndarray = np.array(
    [[0.65, 0.70, 0.29],  # haematoxylin
     [0.07, 0.99, 0.11],  # eosin
     [0.27, 0.57, 0.78]],  # DAB
    dtype=np.float64,
)
HED_FROM_RGB: np.ndarray = np.linalg.inv(RGB_FROM_HED)

#: Index of each stain in the HED space.
STAINS: dict[str, int] = {"h": 0, "e": 1, "dab": 2}

#: Smallest intensity before the logarithm, and the matching normalisation (scikit-image's choice):
#: ``od = log(max(rgb, EPS)) / log(EPS)`` maps rgb=1 → 0 and rgb=EPS → 1.
EPS: float = 1e-6
LOG_ADJUST: float = float(np.log(EPS))  # negative


def stain_index(name: str) -> int:
    """Index of stain ``name`` ('h', 'e' or 'dab', case-insensitive) in HED space."""
    key = name.lower()
    if key in ("hematoxylin", "haematoxylin"):
        key = "h"
    if key in ("eosin",):
        key = "e"
    if key not in STAINS:
        raise ValueError(f"unknown stain {name!r}; expected one of 'h', 'e', 'dab'")
    return STAINS[key]


def stain_matrix_from_vectors(
    h: np.ndarray | list[float] | None = None,
    e: np.ndarray | list[float] | None = None,
    dab: np.ndarray | list[float] | None = None,
) -> np.ndarray:
    """Build a 3×3 ``rgb_from_hed`` matrix from user-supplied stain OD vectors.

    Each vector is normalised to unit length. At most one may be omitted: it is then the
    normalised cross product of the other two (the usual completion of a two-stain matrix,
    Ruifrok & Johnston §2), oriented to have a non-negative sum so that its OD stays physical.

    Returns:
        ``[3, 3]`` float64, rows H, E, DAB.
    """
    vecs = [None if v is None else np.asarray(v, dtype=np.float64).reshape(3) for v in (h, e, dab)]
    missing = [i for i, v in enumerate(vecs) if v is None]
    if len(missing) > 1:
        raise ValueError("give at least two of the h, e and dab stain vectors")
    for i, v in enumerate(vecs):
        if v is not None:
            n = np.linalg.norm(v)
            if not np.isfinite(n) or n < 1e-12:
                raise ValueError(f"stain vector {['h', 'e', 'dab'][i]} is zero or not finite")
            vecs[i] = v / n
    if missing:
        a, b = (v for v in vecs if v is not None)
        c = np.cross(a, b)
        n = np.linalg.norm(c)
        if n < 1e-8:
            raise ValueError("the two given stain vectors are parallel; cannot complete the matrix")
        c = c / n
        if c.sum() < 0:
            c = -c
        vecs[missing[0]] = c
    m = np.stack(vecs)  # type: ignore[arg-type]
    if abs(np.linalg.det(m)) < 1e-8:
        raise ValueError("stain vectors are linearly dependent; the matrix cannot be inverted")
    return m

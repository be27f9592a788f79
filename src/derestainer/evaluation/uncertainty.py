"""Per-image vectors of an evaluation and the bootstrap confidence interval of every reported number.

:func:`per_image_vectors` collects, for every image, each value a Table-1 number is a statistic of
(SSIM, PSNR, the top-k and kNN hits with and without the image's own ground truth in the library,
the evaluator's direct hit, the stain statistics of both images, and whether the nearest library
entry is the image's own ground truth). :func:`intervals` turns them into
``metrics.json → uncertainty`` (:mod:`derestainer.metrics.bootstrap`); the benchmark keeps the
vectors to compare models image by image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from derestainer.metrics import bootstrap, stain

#: ``(name in the report, statistic, per-image vector(s))`` of every interval, in report order.
INTERVALS: tuple[tuple[str, bootstrap.Stat, tuple[str, ...]], ...] = (  # those whose vectors exist
    ("ssim", "mean", ("ssim",)),
    ("psnr", "mean", ("psnr",)),
    ("top1", "mean", ("top1",)),
    ("top3", "mean", ("top3",)),
    ("top5", "mean", ("top5",)),
    ("knn", "mean", ("knn",)),
    *((f"{k}_{v}_self", "mean", (f"{k}_{v}_self",)) for v in ("exclude", "include") for k in ("top1", "top3", "top5", "knn")),
    ("evaluator_accuracy", "mean", ("evaluator_hit",)),
    ("self_match_rate", "mean", ("self_match",)),
    ("dab_od_r", "pearson", ("dab_od_pred", "dab_od_gt")),
    ("dab_fraction_r", "pearson", ("dab_fraction_pred", "dab_fraction_gt")),
    ("h_od_r", "pearson", ("h_od_pred", "h_od_gt")),
)


def per_image_vectors(rows_raw: Sequence[dict[str, Any]], semantic: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """``{name: [N] float array}`` in pairing order: the pixel and stain values, and with
    ``semantic`` (:func:`semantic_vectors`) the semantic ones."""
    out: dict[str, np.ndarray] = {
        "ssim": np.array([r["ssim"] for r in rows_raw], dtype=np.float64),
        "psnr": np.array([r["psnr"] for r in rows_raw], dtype=np.float64),
    }
    for k in stain.STAT_NAMES:
        for side in ("pred", "gt"):
            out[f"{k}_{side}"] = np.array([r[f"{k}_{side}"] for r in rows_raw], dtype=np.float64)
    if semantic:
        out.update(semantic)
    return out


def semantic_vectors(variants: dict[str, dict[str, Any]], chosen: str, levels: np.ndarray,
                     direct_pred: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image hits of both library variants (``chosen`` under the plain names, the other as
    ``top1_exclude_self`` … or ``top1_include_self`` …), the evaluator's direct hit, and the
    self-match indicator (the nearest entry of the full library is the image's own ground truth)."""
    other = "exclude" if chosen == "include" else "include"
    out = {k: np.asarray(h, dtype=np.float64) for k, h in variants[chosen]["hits"].items()}
    out.update({f"{k}_{other}_self": np.asarray(h, dtype=np.float64) for k, h in variants[other]["hits"].items()})
    out["evaluator_hit"] = (np.asarray(direct_pred) == levels).astype(np.float64)
    nb = variants["include"]["neighbours"]
    n = levels.size
    out["self_match"] = (nb[:, 0] == np.arange(n)).astype(np.float64) if nb.shape[1] else np.zeros(n)
    return out


def intervals(vectors: dict[str, np.ndarray], b: int, seed: int, confidence: float) -> dict[str, Any]:
    """``metrics.json → uncertainty``: every available interval over one shared draw of images."""
    n = int(vectors["ssim"].size)
    out: dict[str, Any] = {
        "method": ("percentile bootstrap over images (resampled with replacement, one draw shared by all metrics; "
                   "the semantic library held fixed); PSNR mean over finite values as reported"),
        "b": b, "seed": seed, "confidence": confidence, "n_images": n, "metrics": {},
    }
    if b < 2 or n < 2:
        out["note"] = "not computed: needs at least 2 images and --bootstrap >= 2"
        return out
    idx = bootstrap.resample_indices(n, b, seed)
    for name, stat, keys in INTERVALS:
        if all(k in vectors for k in keys):
            out["metrics"][name] = bootstrap.bootstrap_ci([vectors[k] for k in keys], stat, idx, confidence)
    return out


__all__ = ["INTERVALS", "intervals", "per_image_vectors", "semantic_vectors"]

"""Evaluation metrics: BCI-protocol SSIM/PSNR, the paper's semantic top-k/kNN accuracy, stain agreement, FID/KID.

Definitions and every choice are in docs/evaluation.md. Only pure functions on arrays live here, in
:mod:`.pixel`, :mod:`.semantic`, :mod:`.stain` and :mod:`.fid`; running them over two folders of
images and writing the report is the evaluation pipeline, :mod:`derestainer.evaluation`.
(``fid`` is not re-exported here: the submodule of that name stays reachable as
``derestainer.metrics.fid``.) ``confusion_matrix`` is :func:`derestainer.core.levels.confusion_matrix`.
"""

from derestainer.core.levels import confusion_matrix
from derestainer.metrics.fid import frechet_distance, kid
from derestainer.metrics.pixel import pixel_metrics, psnr, resize_to, ssim
from derestainer.metrics.semantic import (
    cosine_similarity,
    knn_vote,
    l2_normalize,
    nearest_neighbours,
    semantic_metrics,
)
from derestainer.metrics.stain import agreement, pearson_r, stain_stats

__all__ = [
    "agreement",
    "confusion_matrix",
    "cosine_similarity",
    "frechet_distance",
    "kid",
    "knn_vote",
    "l2_normalize",
    "nearest_neighbours",
    "pearson_r",
    "pixel_metrics",
    "psnr",
    "resize_to",
    "semantic_metrics",
    "ssim",
    "stain_stats",
]

"""Evaluation metrics: BCI-protocol SSIM/PSNR, the paper's semantic top-k/kNN accuracy, stain agreement, FID/KID.

Definitions and every choice are in docs/evaluation.md. Pure functions live in :mod:`.pixel`,
:mod:`.semantic`, :mod:`.stain` and :mod:`.fid`; :func:`derestainer.metrics.evaluate.evaluate` runs
them over two folders and :func:`write_report` writes the results. (``evaluate`` and ``fid`` are not
re-exported here: the submodules of those names stay reachable as ``derestainer.metrics.evaluate``
and ``derestainer.metrics.fid``.)
"""

from .evaluate import (
    EvaluationError,
    EvaluationResult,
    Pair,
    Pairing,
    level_from_name,
    match_pairs,
    read_labels_csv,
)
from .fid import frechet_distance, kid
from .pixel import pixel_metrics, psnr, resize_to, ssim
from .report import write_report
from .semantic import (
    confusion_matrix,
    cosine_similarity,
    knn_vote,
    l2_normalize,
    nearest_neighbours,
    semantic_metrics,
)
from .stain import agreement, pearson_r, stain_stats

__all__ = [
    "EvaluationError",
    "EvaluationResult",
    "Pair",
    "Pairing",
    "agreement",
    "confusion_matrix",
    "cosine_similarity",
    "frechet_distance",
    "kid",
    "knn_vote",
    "l2_normalize",
    "level_from_name",
    "match_pairs",
    "nearest_neighbours",
    "pearson_r",
    "pixel_metrics",
    "psnr",
    "read_labels_csv",
    "resize_to",
    "semantic_metrics",
    "ssim",
    "stain_stats",
    "write_report",
]

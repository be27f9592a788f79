"""Aggregation of an evaluation: per-image results → the sections of ``metrics.json`` and the per-image rows.

Every function here is plain NumPy on what the per-image pass (:mod:`.pool`) and the evaluator
(:mod:`.features`) produced; the metric definitions themselves are in :mod:`derestainer.metrics`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from derestainer.core import resample
from derestainer.core.errors import EvaluationError
from derestainer.core.io import jsonable as core_jsonable
from derestainer.core.levels import HER2_LEVELS, confusion_matrix
from derestainer.evaluation.options import EvaluateOptions
from derestainer.evaluation.pairing import Pair, listing
from derestainer.metrics import pixel, stain
from derestainer.metrics.fid import fid, kid
from derestainer.metrics.semantic import SELF_MATCH_CHOICES, SelfMatch, semantic_metrics

Warn = Callable[[str], None]

#: Above this self-match rate (own ground truth = nearest library entry) a report with the own ground truth
#: in the library warns that its top-1 is mostly self-matches (docs/evaluation.md, "Self-inclusion").
SELF_MATCH_WARNING: float = 0.25


@dataclass(frozen=True)
class Embeddings:
    """The evaluator's outputs for all pairs: features ``[N, D]``, logits ``[N, C]`` and their argmax ``[N]``."""

    f_pred: np.ndarray
    f_gt: np.ndarray
    l_pred: np.ndarray
    l_gt: np.ndarray

    @property
    def dir_pred(self) -> np.ndarray:
        return self.l_pred.argmax(axis=1)

    @property
    def dir_gt(self) -> np.ndarray:
        return self.l_gt.argmax(axis=1)


def pairing_check(thumbs_pred: np.ndarray, thumbs_gt: np.ndarray) -> dict[str, Any]:
    """Is each prediction more like its own ground truth than like the others? (grey 32 px thumbnails)

    Returns the mean Pearson r of matched pairs, the mean r over all mismatched pairs, the fraction
    of predictions whose own ground truth is the most correlated, and each image's rank (1 = own
    ground truth is the best match). A file-name mix-up (contents swapped) shows as ranks > 1.
    A flat prediction (one colour, e.g. a floor image) has no correlation with anything: the two
    means are taken over the other predictions (NaN when every one is flat), and ``flat_predictions``
    counts them.
    """
    def z(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a = a - a.mean(axis=1, keepdims=True)
        n = np.linalg.norm(a, axis=1, keepdims=True)
        return np.divide(a, n, out=np.zeros_like(a), where=n > 0), n[:, 0] > 0

    n = thumbs_pred.shape[0]
    zp, varied = z(thumbs_pred.astype(np.float64).reshape(n, -1))
    r = zp @ z(thumbs_gt.astype(np.float64).reshape(n, -1))[0].T  # [N, N]
    own = np.diagonal(r).copy()
    rank = 1 + (r > own[:, None]).sum(axis=1)
    m = int(varied.sum())
    rv = r[varied]
    matched = float(own[varied].mean()) if m else float("nan")
    other = (rv.sum() - own[varied].sum()) / (m * (n - 1)) if m and n > 1 else float("nan")
    return {"matched_r_mean": matched, "other_r_mean": float(other),
            "own_best_fraction": float((rank == 1).mean()), "chance": 1.0 / n, "rank": rank, "r": own,
            "flat_predictions": n - m}


def jsonable(obj: Any) -> Any:
    """:func:`derestainer.core.io.jsonable` with non-finite floats as ``None``: JSON has no inf/NaN,
    and the report gives counts beside (``n_inf``)."""
    return core_jsonable(obj, "null")


def versions() -> dict[str, str]:
    """Installed versions of the packages that compute the numbers."""
    out = {}
    for pkg in ("derestainer", "scikit-image", "numpy", "pillow", "torch"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def _level_str(level: int) -> str:
    return HER2_LEVELS[level] if 0 <= level < len(HER2_LEVELS) else str(level)


def pixel_section(rows_raw: Sequence[dict[str, Any]], warn: Warn) -> dict[str, Any]:
    """``{'ssim': summary, 'psnr': summary}`` (:func:`derestainer.metrics.pixel.summarize`)."""
    ssims = np.array([r["ssim"] for r in rows_raw])
    psnrs = np.array([r["psnr"] for r in rows_raw])
    if np.isinf(psnrs).any():
        warn(f"{int(np.isinf(psnrs).sum())} prediction(s) are pixel-identical to their ground truth (PSNR inf); "
             "the PSNR mean is over the finite values")
    return {"ssim": pixel.summarize(ssims), "psnr": pixel.summarize(psnrs)}


def stain_section(rows_raw: Sequence[dict[str, Any]], levels: np.ndarray, dab_threshold: float, h_threshold: float,
                  warn: Warn) -> dict[str, Any]:
    """Agreement of every stain statistic between generated and real (:func:`derestainer.metrics.stain.agreement`)."""
    out: dict[str, Any] = {"thresholds_od10": {"dab": dab_threshold, "h": h_threshold}}
    # Images without a known level (-1) are left out of the per-level breakdown only (agreement skips them).
    n_unknown = int((levels < 0).sum())
    if n_unknown:
        warn(f"{n_unknown} of {levels.size} image(s) have no known HER2 level: they count in the overall stain agreement "
             "but are missing from its per-level table")
    for k in stain.STAT_NAMES:
        g = np.array([r[f"{k}_pred"] for r in rows_raw])
        rl = np.array([r[f"{k}_gt"] for r in rows_raw])
        out[k] = stain.agreement(g, rl, levels)
    return out


def resize_record(rows_raw: Sequence[dict[str, Any]], resize_filter: str, pred_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``metrics.json → protocol.resize``: the filter applied here, to how many predictions, from which sizes to
    which, and what ``translate`` recorded of its own resize (``predictions.json → output``, when present)."""
    resized = sum(1 for r in rows_raw if r["resized"])
    out: dict[str, Any] = {
        "filter": resize_filter,
        "method": resample.describe(resize_filter) + ", to the ground truth's size",
        "resized": resized, "not_resized": len(rows_raw) - resized,
        "pred_sizes": dict(Counter(r["pred_size"] for r in rows_raw)),
        "gt_sizes": dict(Counter(r["gt_size"] for r in rows_raw)),
    }
    record = Path(pred_dir) / "predictions.json"
    if record.is_file():
        try:
            upstream = json.loads(record.read_text()).get("output")
        except (OSError, ValueError, AttributeError):
            upstream = "predictions.json unreadable"
        out["translate"] = upstream
    return out


def per_image_rows(pairs: Sequence[Pair], rows_raw: Sequence[dict[str, Any]], pc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per pair for ``per_image.csv`` (semantic columns are added by :func:`semantic_section`)."""
    rows: list[dict[str, Any]] = []
    for i, (p, r) in enumerate(zip(pairs, rows_raw, strict=True)):
        rows.append({
            "name": p.name, "level": HER2_LEVELS[p.level] if p.level >= 0 else "",
            "ssim": r["ssim"], "psnr": r["psnr"],
            **{f"{k}_{s}": r[f"{k}_{s}"] for k in stain.STAT_NAMES for s in ("pred", "gt")},
            "pair_r": float(pc["r"][i]), "pair_rank": int(pc["rank"][i]),
            "pred_size": r["pred_size"], "gt_size": r["gt_size"],
            "pred_file": p.pred.name, "gt_file": p.gt.name,
        })
    return rows


def _direct(levels: np.ndarray, dir_pred: np.ndarray, dir_gt: np.ndarray, n_classes: int) -> dict[str, Any]:
    cm_pred = confusion_matrix(levels, dir_pred, n_classes)
    cm_gt = confusion_matrix(levels, dir_gt, n_classes)
    return {
        "accuracy_generated": float(np.trace(cm_pred) / max(cm_pred.sum(), 1)),
        "accuracy_ground_truth": float(np.trace(cm_gt) / max(cm_gt.sum(), 1)),
        "confusion_generated": cm_pred, "confusion_ground_truth": cm_gt,
    }


def library_metrics(
    sem: dict[str, Any], rows: list[dict[str, Any]], pairs: Sequence[Pair], emb: Embeddings, levels: np.ndarray,
    opts: EvaluateOptions, warn: Warn,
) -> dict[str, dict[str, Any]]:
    """Top-k/kNN accuracy (both self-match variants), direct accuracy, confusions and the self-match rate
    into ``sem``; kNN columns into ``rows``. Returns both variants (:func:`~derestainer.metrics.semantic.semantic_metrics`)."""
    n, n_classes = len(pairs), emb.l_pred.shape[1]
    if np.any(levels >= n_classes):
        raise EvaluationError(f"levels go up to {int(levels.max())} but the evaluator has {n_classes} classes")
    variants: dict[str, dict[str, Any]] = {sm: semantic_metrics(emb.f_pred, emb.f_gt, levels, levels, self_index=np.arange(n), self_match=sm,
                                     ks=tuple(opts.topk), knn_k=opts.knn_k, tie=opts.tie, n_classes=n_classes)
                for sm in SELF_MATCH_CHOICES}
    head = variants[opts.self_match]
    ks = [f"top{k}" for k in opts.topk]
    for k in [*ks, "knn", "knn_k", "topk_k", "per_level"]:
        sem[k] = head[k]
    other: SelfMatch = "exclude" if opts.self_match == "include" else "include"
    sem[f"{other}_self"] = {k: variants[other][k] for k in [*ks, "knn", "knn_k", "per_level"]}
    if head["knn_k"] < opts.knn_k:
        warn(f"kNN uses k={head['knn_k']}: the library has too few images for k={opts.knn_k}")
    sem["direct"] = _direct(levels, emb.dir_pred, emb.dir_gt, n_classes)
    sem["knn_confusion"] = confusion_matrix(levels, head["knn_pred"], n_classes)
    nb, ns, knn_pred = head["neighbours"], head["neighbour_sims"], head["knn_pred"]
    for i, row in enumerate(rows):
        row["knn_level"] = HER2_LEVELS[int(knn_pred[i])] if knn_pred[i] >= 0 else ""
        row["top1_neighbour"] = pairs[int(nb[i, 0])].name if nb.shape[1] else ""
        row["top1_similarity"] = float(ns[i, 0]) if ns.shape[1] else float("nan")
    nb_all = variants["include"]["neighbours"]
    own = nb_all[:, 0] == np.arange(n) if nb_all.shape[1] else np.zeros(n, dtype=bool)
    sem["self_match_rate"] = float(own.mean()) if n else float("nan")
    if n and sem["self_match_rate"] > SELF_MATCH_WARNING and opts.self_match == "include":
        warn(f"{sem['self_match_rate']:.0%} of the generated images have their own ground truth as nearest library entry: "
             "top-1 with it included measures closeness to that very image more than the HER2 level; "
             "read the exclude-self variant beside it")
    for i, row in enumerate(rows):
        row["own_gt_nearest"] = int(own[i])
    return variants


def distribution(f_pred: np.ndarray, f_gt: np.ndarray, kid_subsets: int, kid_subset_size: int, seed: int,
                 warn: Warn) -> dict[str, Any]:
    """FID and KID on the evaluator's features (None, with a warning, where they cannot be computed)."""
    n = f_gt.shape[0]
    out: dict[str, Any] = {"features": "evaluator pooled features (not L2-normalised, not Inception)"}
    if n >= 2:
        out["fid"] = _safe(lambda: fid(f_pred, f_gt), warn, "FID")
        out["kid"] = _safe(lambda: kid(f_pred, f_gt, n_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed),
                           warn, "KID")
        if n <= f_gt.shape[1]:
            out["note"] = (f"{n} images for {f_gt.shape[1]} feature dimensions: the covariance is singular and FID "
                           "is biased; compare only at equal set sizes")
    return out


def direct_columns(rows: list[dict[str, Any]], emb: Embeddings) -> None:
    """The evaluator's own level predictions for every image into ``rows``."""
    for i, row in enumerate(rows):
        row["pred_level_direct"] = _level_str(int(emb.dir_pred[i]))
        row["gt_level_direct"] = _level_str(int(emb.dir_gt[i]))


def _safe(fn: Callable[[], Any], warn: Warn, what: str) -> Any:
    try:
        return fn()
    except ValueError as exc:
        warn(f"{what} not computed: {exc}")
        return None


def unknown_levels_error(pairs: Sequence[Pair]) -> EvaluationError:
    """The error for a partial labelling: semantic metrics need a level for every image."""
    unknown = [p.name for p in pairs if p.level < 0]
    return EvaluationError(f"{len(unknown)} image(s) have no HER2 level (not in the BCI name, not in the labels CSV): "
                           f"{listing(unknown)}; semantic metrics need a level for every image")

"""Evaluate a folder of generated IHC against a folder of ground truth: pairing, the per-image pass, aggregation.

The per-image pass (:mod:`.pool`) runs in worker processes, one image pair per task. When an
evaluator classifier is given, the main process streams the resized images through it in batches
(:mod:`.features`) while the workers go on, so every file is read once. Pairing is by file name
(:mod:`.pairing`); the sections of the result are assembled by :mod:`.summary`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from derestainer.core.io import read_image
from derestainer.core.levels import read_labels_csv
from derestainer.evaluation import summary, uncertainty
from derestainer.evaluation.features import Embedder, independence_warnings, load_evaluator
from derestainer.evaluation.options import EvaluateOptions
from derestainer.evaluation.pairing import Pair, Pairing, match_pairs
from derestainer.evaluation.pool import PairTask, iterate_pairs
from derestainer.metrics import stain
from derestainer.metrics.semantic import SelfMatch, Tie

#: Metadata of the evaluator copied into the report.
_EVALUATOR_KEYS = ("arch", "seed", "size", "accuracy", "train_images_hash")


@dataclass
class EvaluationResult:
    """Everything :func:`evaluate` found: aggregate ``metrics`` (JSON-able), one row per image, warnings."""

    metrics: dict[str, Any]
    rows: list[dict[str, Any]]
    pairs: list[Pair]
    warnings: list[str] = field(default_factory=list)
    #: per-image values (pairing order) that the numbers are statistics of (:mod:`.uncertainty`)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class _Evaluator:
    embedder: Embedder
    meta: dict[str, Any]
    source: str
    size: int | None


def _open_evaluator(opts: EvaluateOptions, pairs: Sequence[Pair], warn: Callable[[str], None]) -> _Evaluator | None:
    if opts.classifier is None:
        return None
    model, meta, source, dev = load_evaluator(opts.classifier, opts.device)
    raw = opts.classifier_size if opts.classifier_size is not None else meta.get("size")
    size = int(raw) if raw is not None else None
    first_shape = None
    if size is None and pairs:
        # No input size: the images go in at their own, which must be the first ground truth's for all
        # (checked per image, so the error does not depend on how the images fall into batches).
        h, w = read_image(pairs[0].gt).shape[:2]
        first_shape = (int(h), int(w))
    embedder = Embedder(model, size, dev, opts.batch_size, shape=first_shape, names=[str(p.gt) for p in pairs])
    if opts.comparator is not None:
        for w in independence_warnings(opts.comparator, meta):
            warn(f"evaluator not independent of the comparator: {w}")
    return _Evaluator(embedder, meta, source, size)


def _per_image_pass(pairs: Sequence[Pair], opts: EvaluateOptions, ev: _Evaluator | None, workers: int) -> list[dict[str, Any]]:
    tasks = [PairTask(i, str(p.pred), str(p.gt), ev is not None, opts.dab_threshold, opts.h_threshold, opts.resize_filter)
             for i, p in enumerate(pairs)]
    per: list[dict[str, Any] | None] = [None] * len(pairs)
    with tqdm(total=len(pairs), desc="evaluate", unit="img", disable=not opts.progress, leave=False) as bar:
        for res in iterate_pairs(tasks, workers):
            i = res["index"]
            if ev is not None:
                ev.embedder.add(i, res.pop("img_pred"), res.pop("img_gt"))
            per[i] = res
            bar.update(1)
    if ev is not None:
        ev.embedder.flush()
    return [r for r in per if r is not None]


def _semantic(ev: _Evaluator, pairs: Sequence[Pair], rows: list[dict[str, Any]], levels: np.ndarray,
              opts: EvaluateOptions, warn: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``metrics.json → semantic`` and the per-image semantic vectors (:func:`.uncertainty.semantic_vectors`)."""
    emb = summary.Embeddings(*ev.embedder.stacked(len(pairs)))
    vectors: dict[str, np.ndarray] = {}
    sem: dict[str, Any] = {
        "evaluator": {"source": ev.source, **{k: ev.meta.get(k) for k in _EVALUATOR_KEYS if k in ev.meta},
                      "input_size": ev.size if ev.size is not None else "ground-truth size",
                      "feature_dim": int(emb.f_gt.shape[1])},
        "self_match": opts.self_match, "tie": opts.tie,
    }
    if np.all(levels >= 0):
        variants = summary.library_metrics(sem, rows, pairs, emb, levels, opts, warn)
        vectors = uncertainty.semantic_vectors(variants, opts.self_match, levels, emb.dir_pred)
    elif np.any(levels >= 0):
        raise summary.unknown_levels_error(pairs)
    else:
        warn("no HER2 levels (names are not BCI names and no --labels CSV): top-k/kNN accuracy skipped, FID/KID computed")
    summary.direct_columns(rows, emb)
    sem["distribution"] = summary.distribution(emb.f_pred, emb.f_gt, opts.kid_subsets, opts.kid_subset_size, opts.seed, warn)
    return sem, vectors


def _pairing(pred_dir: str | os.PathLike[str], gt_dir: str | os.PathLike[str], opts: EvaluateOptions,
             warn: Callable[[str], None]) -> Pairing:
    labels = read_labels_csv(opts.labels_csv) if opts.labels_csv is not None else None
    pairing = match_pairs(pred_dir, gt_dir, allow_missing=opts.allow_missing, labels=labels, pred_suffix=opts.pred_suffix)
    if pairing.missing or pairing.extra:
        warn(f"--allow-missing: evaluating {len(pairing.pairs)} pair(s); left out {len(pairing.missing)} ground truth(s) "
             f"without prediction and {len(pairing.extra)} prediction(s) without ground truth")
    return pairing


def run_evaluation(pred_dir: str | os.PathLike[str], gt_dir: str | os.PathLike[str],
                   opts: EvaluateOptions | None = None) -> EvaluationResult:
    """Evaluate generated IHC in ``pred_dir`` against the ground truth in ``gt_dir`` (see docs/evaluation.md).

    Raises:
        EvaluationError: pairing or sizes are wrong (the message names the files).
        LabelError: the labels CSV is malformed (the message names the file and line).
        ImageReadError: an image cannot be read (the message names it).
    """
    opts = opts or EvaluateOptions()
    t0 = time.perf_counter()
    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        if opts.log is not None:
            opts.log(f"warning: {msg}")

    pairing = _pairing(pred_dir, gt_dir, opts, warn)
    pairs = pairing.pairs
    n = len(pairs)
    n_workers = int(opts.workers) if opts.workers else (os.cpu_count() or 1)
    ev = _open_evaluator(opts, pairs, warn)
    rows_raw = _per_image_pass(pairs, opts, ev, n_workers)
    levels = np.array([p.level for p in pairs], dtype=np.int64)
    metrics: dict[str, Any] = {
        "n_images": n,
        "left_out": {"missing_prediction": len(pairing.missing), "extra_prediction": len(pairing.extra),
                     "names_missing_prediction": pairing.missing, "names_extra_prediction": pairing.extra},
        "pixel": summary.pixel_section(rows_raw, warn),
        "stain": summary.stain_section(rows_raw, levels, opts.dab_threshold, opts.h_threshold, warn),
    }
    pc = summary.pairing_check(np.stack([r["thumb_pred"] for r in rows_raw]), np.stack([r["thumb_gt"] for r in rows_raw]))
    metrics["pairing_check"] = {k: pc[k] for k in ("matched_r_mean", "other_r_mean", "own_best_fraction", "chance",
                                                    "flat_predictions")}
    if n - pc["flat_predictions"] >= 3 and not pc["matched_r_mean"] > pc["other_r_mean"]:
        warn(f"pairing check: predictions are no more like their own ground truth (mean r {pc['matched_r_mean']:.3f}) "
             f"than like the others (mean r {pc['other_r_mean']:.3f}); are the file names of the right images?")
    rows = summary.per_image_rows(pairs, rows_raw, pc)
    sem_vectors: dict[str, np.ndarray] = {}
    if ev is not None:
        metrics["semantic"], sem_vectors = _semantic(ev, pairs, rows, levels, opts, warn)
    vectors = uncertainty.per_image_vectors(rows_raw, sem_vectors)
    metrics["uncertainty"] = uncertainty.intervals(vectors, opts.bootstrap, opts.seed, opts.confidence)
    elapsed = time.perf_counter() - t0
    metrics["protocol"] = {
        "resize": summary.resize_record(rows_raw, opts.resize_filter, pred_dir),
        "ssim": "skimage.metrics.structural_similarity(gt, pred, channel_axis=-1, data_range=255): 7x7 uniform window",
        "psnr": "skimage.metrics.peak_signal_noise_ratio(gt, pred, data_range=255); mean over finite values, n_inf counted",
        "pairing": "by file stem" + (f" after stripping {opts.pred_suffix!r} from predictions" if opts.pred_suffix else ""),
        "pred_dir": str(pred_dir), "gt_dir": str(gt_dir),
    }
    metrics["run"] = {"workers": min(n_workers, n), "seconds": elapsed, "images_per_second": n / elapsed if elapsed > 0 else None,
                      "versions": summary.versions()}
    metrics["warnings"] = list(warnings)
    return EvaluationResult(metrics=summary.jsonable(metrics), rows=rows, pairs=pairs, warnings=warnings, vectors=vectors)


def evaluate(
    pred_dir: str | os.PathLike[str],
    gt_dir: str | os.PathLike[str],
    *,
    classifier: Any = None,
    comparator: str | os.PathLike[str] | None = None,
    labels_csv: str | os.PathLike[str] | None = None,
    allow_missing: bool = False,
    pred_suffix: str = "",
    workers: int | None = None,
    self_match: SelfMatch = "include",
    tie: Tie = "similarity",
    topk: Sequence[int] = (1, 3, 5),
    knn_k: int = 10,
    dab_threshold: float = stain.DAB_THRESHOLD,
    h_threshold: float = stain.H_THRESHOLD,
    device: str = "auto",
    batch_size: int = 16,
    classifier_size: int | None = None,
    resize_filter: str = "bicubic",
    bootstrap: int = 2000,
    confidence: float = 0.95,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> EvaluationResult:
    """:func:`run_evaluation` with the options as keywords (each documented in :class:`EvaluateOptions`).

    Raises:
        EvaluationError: pairing or sizes are wrong, or an unknown ``self_match``/``tie``.
        LabelError: the labels CSV is malformed.
        ImageReadError: an image cannot be read.
    """
    opts = EvaluateOptions(
        classifier=classifier, comparator=comparator, labels_csv=labels_csv, allow_missing=allow_missing,
        pred_suffix=pred_suffix, workers=workers, self_match=self_match, tie=tie, topk=topk, knn_k=knn_k,
        dab_threshold=dab_threshold, h_threshold=h_threshold, device=device, batch_size=batch_size,
        classifier_size=classifier_size, resize_filter=resize_filter, bootstrap=bootstrap, confidence=confidence,
        kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed,
        progress=progress, log=log,
    )
    return run_evaluation(pred_dir, gt_dir, opts)

"""Summary statistics of a Table-1 benchmark: mean and sample standard deviation over seeds, and the
bootstrap intervals and paired differences between models over seeds and test images together."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from derestainer.evaluation.uncertainty import INTERVALS
from derestainer.metrics import bootstrap

#: Per model, per metric: ``{'mean', 'std', 'n', 'values'}``.
Summary = dict[str, dict[str, dict[str, Any]]]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN for a single value). Non-finite values are kept."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = sum(values) / n
    if n == 1:
        return m, math.nan
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def is_number(v: Any) -> bool:
    """A real number (``bool`` is not one)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def summarize(runs: Sequence[dict[str, Any]], models: Sequence[str]) -> Summary:
    """Per model and numeric metric: ``{'mean', 'std', 'n', 'values'}`` over its seeds."""
    out: Summary = {}
    for m in models:
        recs = [r for r in runs if r["model"] == m]
        keys: list[str] = []
        for r in recs:
            keys += [k for k, v in r["metrics"].items() if is_number(v) and k not in keys]
        out[m] = {}
        for k in keys:
            vals = [float(r["metrics"][k]) for r in recs if is_number(r["metrics"].get(k))]
            mu, sd = mean_std(vals)
            out[m][k] = {"mean": mu, "std": sd, "n": len(vals), "values": vals}
    return out


#: The results keys (:func:`~derestainer.benchmark.stages.flatten_metrics`) of the evaluation's interval names
#: where they differ (:data:`derestainer.evaluation.uncertainty.INTERVALS`).
_RESULTS_KEY: dict[str, str] = {"top1_exclude_self": "top1_excl_self", "knn_exclude_self": "knn_excl_self",
                                "dab_od_r": "dab_od_pearson", "h_od_r": "h_od_pearson"}
_COMPARED: frozenset[str] = frozenset({"ssim", "psnr", "top1", "top3", "top5", "knn", "top1_exclude_self",
                                       "knn_exclude_self", "evaluator_accuracy", "self_match_rate", "dab_od_r", "h_od_r"})

#: Metrics compared image by image: ``(results key, statistic, per-image vectors)``, the evaluation's
#: intervals under the benchmark's names.
PAIRED_METRICS: tuple[tuple[str, bootstrap.Stat, tuple[str, ...]], ...] = tuple(
    (_RESULTS_KEY.get(name, name), stat, vectors) for name, stat, vectors in INTERVALS if name in _COMPARED)


def _matrices(recs: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[np.ndarray] | None:
    """``[S, n]`` per vector over a model's runs, or None when a run lacks one."""
    per = [r.get("per_image") or {} for r in recs]
    if not recs or any(k not in p for p in per for k in keys):
        return None
    return [np.array([p[k] for p in per], dtype=np.float64) for k in keys]


def _image_names(runs: Sequence[dict[str, Any]]) -> list[str] | None:
    names = {tuple((r.get("per_image") or {}).get("names") or ()) for r in runs}
    if len(names) != 1 or not next(iter(names)):
        return None
    return list(next(iter(names)))


def comparisons(runs: Sequence[dict[str, Any]], models: Sequence[str], reference: str, b: int = 2000, seed: int = 0,
                confidence: float = 0.95, floors: Sequence[str] = ()) -> dict[str, Any]:
    """Per model: each metric's seed-averaged value with its two-level interval (``intervals``), and its
    paired difference from ``reference`` (``differences``); per metric, the median over the trained
    models (not the ``floors``) of the smallest detectable difference.

    Seeds and test images are resampled together (:func:`derestainer.metrics.bootstrap.paired_difference`).
    Runs recorded without per-image vectors, or on other test images, are left out (``note``).
    """
    out: dict[str, Any] = {"reference": reference, "b": b, "seed": seed, "confidence": confidence,
                           "method": ("two-level percentile bootstrap: runs (seeds) and test images resampled with "
                                      "replacement, images paired between the two models"),
                           "intervals": {}, "differences": {}, "detectable": {}}
    if _image_names(runs) is None:
        out["note"] = "not computed: some runs have no per-image vectors or were scored on other test images"
        return out
    by_model = {m: [r for r in runs if r["model"] == m] for m in models}
    for m, recs in by_model.items():
        out["intervals"][m] = {}
        for key, stat, vec in PAIRED_METRICS:
            mat = _matrices(recs, vec)
            if mat is not None:
                out["intervals"][m][key] = bootstrap.seed_image_interval(mat, stat, b, seed, confidence)
    ref = by_model.get(reference)
    if not ref:
        out["note"] = f"reference model {reference!r} not among the models: no paired differences"
        return out
    for m, recs in by_model.items():
        if m == reference:
            continue
        out["differences"][m] = {}
        for key, stat, vec in PAIRED_METRICS:
            mm, rr = _matrices(recs, vec), _matrices(ref, vec)
            if mm is not None and rr is not None:
                out["differences"][m][key] = bootstrap.paired_difference(mm, rr, stat, b, seed, confidence)
    for key, _, _ in PAIRED_METRICS:
        d = [v[key]["detectable"] for m, v in out["differences"].items()
             if m not in floors and key in v and math.isfinite(v[key]["detectable"])]
        if d:
            out["detectable"][key] = float(np.median(d))
    return out

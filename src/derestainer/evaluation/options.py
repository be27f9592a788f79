"""The options of an evaluation (one field per ``derestainer evaluate`` flag, same defaults)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from derestainer.core.errors import EvaluationError
from derestainer.core.resample import DEFAULT_FILTER, FILTERS
from derestainer.metrics import stain
from derestainer.metrics.semantic import SELF_MATCH_CHOICES, TIE_CHOICES, SelfMatch, Tie


@dataclass(frozen=True)
class EvaluateOptions:
    """How :func:`derestainer.evaluation.run_evaluation` evaluates (see docs/evaluation.md).

    Attributes:
        classifier: evaluator checkpoint path (``load_classifier``) or a module with ``features(x) -> [N, D]``
            and ``forward(x) -> [N, 4]`` logits on ``[N, 3, H, W]`` in [-1, 1]; None skips the semantic metrics.
        comparator: the comparator's checkpoint, only to warn when the evaluator is not independent of it.
        labels_csv: levels (``name,level``) for images whose names do not carry them (BCI names do).
        allow_missing: evaluate the common names only, and report how many were left out.
        pred_suffix: stripped from prediction stems before pairing (e.g. ``_fake_B``).
        workers: processes for the per-image pass (default: all cores).
        self_match, tie, topk, knn_k: semantic-metric options (:mod:`derestainer.metrics.semantic`).
        dab_threshold, h_threshold: positive-area thresholds of the stain statistics (OD₁₀).
        device, batch_size: where and how the evaluator runs.
        classifier_size: evaluator input size; default the checkpoint's ``size``, else the ground truth's.
        resize_filter: how a prediction of another size is brought to its ground truth's
            (:mod:`derestainer.core.resample`; default the protocol's PIL bicubic).
        bootstrap: bootstrap resamples for the confidence intervals (0: none).
        confidence: level of the confidence intervals (default 0.95).
        kid_subsets, kid_subset_size, seed: KID estimation; ``seed`` also seeds the bootstrap.
        progress: show a progress bar.
        log: where to send warnings as they arise (e.g. ``click.echo``).
    """

    classifier: Any = None
    comparator: str | os.PathLike[str] | None = None
    labels_csv: str | os.PathLike[str] | None = None
    allow_missing: bool = False
    pred_suffix: str = ""
    workers: int | None = None
    self_match: SelfMatch = "include"
    tie: Tie = "similarity"
    topk: Sequence[int] = (1, 3, 5)
    knn_k: int = 10
    dab_threshold: float = stain.DAB_THRESHOLD
    h_threshold: float = stain.H_THRESHOLD
    device: str = "auto"
    batch_size: int = 16
    classifier_size: int | None = None
    resize_filter: str = DEFAULT_FILTER
    bootstrap: int = 2000
    confidence: float = 0.95
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    seed: int = 0
    progress: bool = True
    log: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        if self.self_match not in SELF_MATCH_CHOICES:
            raise EvaluationError(f"self_match must be one of {SELF_MATCH_CHOICES}, got {self.self_match!r}")
        if self.tie not in TIE_CHOICES:
            raise EvaluationError(f"tie must be one of {TIE_CHOICES}, got {self.tie!r}")
        if self.resize_filter not in FILTERS:
            raise EvaluationError(f"resize filter must be one of {tuple(FILTERS)}, got {self.resize_filter!r}")
        if self.bootstrap < 0 or self.bootstrap == 1:
            raise EvaluationError(f"bootstrap resamples must be 0 (none) or at least 2, got {self.bootstrap}")
        if not 0.0 < self.confidence < 1.0:
            raise EvaluationError(f"confidence level must lie strictly between 0 and 1, got {self.confidence}")

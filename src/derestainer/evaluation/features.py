"""The evaluator classifier in an evaluation: loading it and streaming images through it in batches.

torch and the classifier are imported inside the functions here, on purpose: the per-image worker
processes import this package (:mod:`derestainer.evaluation.pool`) and an evaluation without an
evaluator never needs torch, so neither pays for importing it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from derestainer.core.errors import CheckpointError, EvaluationError


class Embedder:
    """Streams ``uint8 [H, W, 3]`` images through the evaluator in batches; keeps logits and features.

    With no input ``size`` the images are fed at their own size, which must then be one size for all:
    ``shape`` (the first ground truth's ``(H, W)``) is required of every ground truth, whatever the
    batch it falls in, and ``names[i]`` names pair i's ground truth in the error.
    """

    def __init__(
        self, model: Any, size: int | None, device: Any, batch_size: int,
        shape: tuple[int, int] | None = None, names: Sequence[str] | None = None,
    ) -> None:
        self.model, self.size, self.device, self.batch_size = model, size, device, max(1, int(batch_size))
        self.shape, self.names = shape, names
        self.pending: list[tuple[int, np.ndarray, np.ndarray]] = []
        self.logits: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.features: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def add(self, index: int, pred: np.ndarray, gt: np.ndarray) -> None:
        """Queue pair ``index``'s two images; runs a batch when ``batch_size`` pairs are queued."""
        if self.size is None and self.shape is not None and tuple(gt.shape[:2]) != tuple(self.shape):
            name = self.names[index] if self.names is not None else f"ground truth #{index}"
            first = self.names[0] if self.names is not None else "the first ground truth"
            raise EvaluationError(
                f"{name}: ground truth is {gt.shape[1]}x{gt.shape[0]} px, but {first} is "
                f"{self.shape[1]}x{self.shape[0]} px; the evaluator has no input size of its own to resize them to: "
                "give one (--classifier-size)"
            )
        self.pending.append((index, pred, gt))
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        """Run the queued pairs through the evaluator (predictions first, then ground truths, one batch)."""
        if not self.pending:
            return
        import torch  # see the module docstring: only when an evaluator is used

        from derestainer.models.classifier import prepare_images  # (same reason)

        n = len(self.pending)
        ims = [p for _, p, _ in self.pending] + [g for _, _, g in self.pending]
        with torch.no_grad():
            if len({im.shape for im in ims}) == 1:
                x = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).to(self.device)
                x = prepare_images(x, self.size)
            else:  # ground truths of different sizes: resize one by one, then batch
                if self.size is None:
                    raise EvaluationError("ground-truth images differ in size; give the classifier input size (--classifier-size)")
                x = torch.cat([prepare_images(torch.from_numpy(np.require(im, requirements=("C", "W"))).permute(2, 0, 1).to(self.device), self.size)
                               for im in ims])
            if hasattr(self.model, "forward_with_features"):
                logits, feats = self.model.forward_with_features(x)
            else:
                feats = self.model.features(x)
                logits = self.model(x)
        lg = logits.float().cpu().numpy()
        ft = feats.float().cpu().numpy()
        for j, (i, _, _) in enumerate(self.pending):
            self.logits[i] = (lg[j], lg[n + j])
            self.features[i] = (ft[j], ft[n + j])
        self.pending.clear()

    def stacked(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(features_pred, features_gt, logits_pred, logits_gt)`` of pairs ``0..n-1``, each ``[n, ...]``."""
        return (np.stack([self.features[i][0] for i in range(n)]), np.stack([self.features[i][1] for i in range(n)]),
                np.stack([self.logits[i][0] for i in range(n)]), np.stack([self.logits[i][1] for i in range(n)]))


def load_evaluator(classifier: Any, device: str) -> tuple[Any, dict[str, Any], str, Any]:
    """``(model in eval mode on the device, its metadata, a description of its source, the torch device)``.

    ``classifier`` is a checkpoint path (:func:`~derestainer.models.classifier.load_classifier`) or a
    module with ``features(x)`` and ``forward(x)``; ``device`` a spec for :func:`~derestainer.core.device.resolve_device`.
    """
    from derestainer.core.device import resolve_device  # imports torch: see the module docstring
    from derestainer.models.classifier import load_classifier  # (same reason)

    dev = resolve_device(device)
    if isinstance(classifier, (str, os.PathLike)):
        try:
            model, meta = load_classifier(classifier, dev)
        except CheckpointError as exc:
            raise EvaluationError(str(exc)) from None
        return model.eval(), dict(meta), str(classifier), dev
    return classifier.to(dev).eval(), {}, type(classifier).__name__, dev


def independence_warnings(comparator: str | os.PathLike[str], evaluator_meta: dict[str, Any]) -> list[str]:
    """Why the evaluator may not be independent of the comparator checkpoint (empty: no reason found)."""
    from derestainer.models.classifier import independence_warnings as reasons  # imports torch: see the module docstring
    from derestainer.models.classifier import read_classifier_meta  # (same reason)

    try:  # a generator (or a tampered classifier) given as --comparator is refused, naming it
        return reasons(read_classifier_meta(comparator), evaluator_meta)
    except CheckpointError as exc:
        raise EvaluationError(str(exc)) from None

"""Scores of a HER2 classifier: accuracy, balanced accuracy, per-level recall and the confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from derestainer.core.levels import HER2_LEVELS, confusion_matrix
from derestainer.models.classifier import HER2Classifier, prepare_images


def classification_metrics(confusion: np.ndarray) -> dict[str, Any]:
    """Accuracy, balanced accuracy (mean recall over levels present) and per-level recall from a confusion matrix.

    Levels absent from the true labels have recall ``None`` and do not enter the balanced accuracy.
    """
    cm = np.asarray(confusion, dtype=np.int64)
    n = int(cm.sum())
    support = cm.sum(axis=1)
    recall = [float(cm[i, i] / support[i]) if support[i] else None for i in range(cm.shape[0])]
    present = [r for r in recall if r is not None]
    return {
        "accuracy": float(np.trace(cm) / n) if n else None,
        "balanced_accuracy": float(np.mean(present)) if present else None,
        "per_level_recall": recall,
        "support": [int(s) for s in support],
        "n": n,
        "confusion": cm.tolist(),
    }


def format_confusion(confusion: np.ndarray | Sequence[Sequence[int]], names: Sequence[str] = HER2_LEVELS) -> str:
    """Plain-text confusion matrix (rows = true level, columns = predicted), for the terminal."""
    cm = np.asarray(confusion, dtype=np.int64)
    names = list(names)[: cm.shape[0]] + [str(i) for i in range(len(names), cm.shape[0])]
    w = max(6, max(len(str(int(v))) for v in cm.ravel()) + 2 if cm.size else 6)
    lines = ["true\\pred".ljust(10) + "".join(n.rjust(w) for n in names)]
    for name, row in zip(names, cm, strict=False):
        lines.append(name.ljust(10) + "".join(str(int(v)).rjust(w) for v in row))
    return "\n".join(lines)


@torch.no_grad()
def evaluate_classifier(
    model: HER2Classifier,
    data: Dataset,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    workers: int = 0,
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-level recall and confusion matrix on items ``(uint8 image, level)``."""
    dev = torch.device(device)
    was_training = model.training
    model.eval()
    true: list[int] = []
    pred: list[int] = []
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers)
    for x, y in loader:
        logits = model(prepare_images(x.to(dev)))
        pred += logits.argmax(1).cpu().tolist()
        true += torch.as_tensor(y).tolist()
    model.train(was_training)
    return classification_metrics(confusion_matrix(true, pred, model.n_levels))

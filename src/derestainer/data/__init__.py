"""Paired data: BCI / MIST / folder datasets, synchronised paired transforms, model-space conversion.

``derestainer.data.synth`` (SynthBCI) is a separate module. The names below are imported on first
use (PEP 562), so that importing ``derestainer.data.synth`` — a NumPy-only generator run in worker
processes — does not import torch. HER2 level parsing and the label CSV live in
:mod:`derestainer.core.levels`, the error classes in :mod:`derestainer.core.errors`.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Where each exported name lives.
_WHERE: dict[str, str] = {
    "BCIDataset": "datasets",
    "MISTDataset": "datasets",
    "PairedFolderDataset": "datasets",
    "PairedImageDataset": "datasets",
    "build_dataset": "datasets",
    "check": "datasets",
    "dataset_levels": "datasets",
    "pair_folders": "datasets",
    "pair_level_counts": "datasets",
    "INTERPOLATIONS": "transforms",
    "PairParams": "transforms",
    "PairedTransform": "transforms",
    "apply_params": "transforms",
    "build_transform": "transforms",
    "from_model_space": "transforms",
    "resize_uint8": "transforms",
    "resized_shape": "transforms",
    "sample_params": "transforms",
    "to_model_space": "transforms",
}

__all__ = [
    "INTERPOLATIONS",
    "BCIDataset",
    "MISTDataset",
    "PairParams",
    "PairedFolderDataset",
    "PairedImageDataset",
    "PairedTransform",
    "apply_params",
    "build_dataset",
    "build_transform",
    "check",
    "dataset_levels",
    "from_model_space",
    "pair_folders",
    "pair_level_counts",
    "resize_uint8",
    "resized_shape",
    "sample_params",
    "to_model_space",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

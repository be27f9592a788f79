"""Paired data: BCI / MIST / folder datasets, synchronised paired transforms, model-space conversion.

``derestainer.data.synth`` (SynthBCI) is a separate module. The names below are imported on first
use (PEP 562), so that importing ``derestainer.data.synth`` — a NumPy-only generator run in worker
processes — does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_DATASETS = (
    "BCI_NAME", "LEVEL_TOKENS", "BCIDataset", "DatasetError", "MISTDataset", "PairedFolderDataset",
    "PairedImageDataset", "PairSizeError", "build_dataset", "check", "dataset_levels", "pair_folders",
    "pair_level_counts", "parse_bci_level", "read_level_csv",
)
_TRANSFORMS = (
    "INTERPOLATIONS", "PairedTransform", "PairParams", "apply_params", "build_transform", "from_model_space",
    "resize_uint8", "resized_shape", "sample_params", "to_model_space",
)
_WHERE = {**{n: "datasets" for n in _DATASETS}, **{n: "transforms" for n in _TRANSFORMS}}

__all__ = [*_DATASETS, *_TRANSFORMS]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

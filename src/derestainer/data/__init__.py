"""Paired data: BCI / MIST / folder datasets, synchronised paired transforms, model-space conversion.

``derestainer.data.synth`` (SynthBCI) is a separate module, imported on demand.
"""

from .datasets import (
    BCI_NAME,
    LEVEL_TOKENS,
    BCIDataset,
    DatasetError,
    MISTDataset,
    PairedFolderDataset,
    PairedImageDataset,
    PairSizeError,
    build_dataset,
    check,
    dataset_levels,
    pair_folders,
    pair_level_counts,
    parse_bci_level,
    read_level_csv,
)
from .transforms import (
    INTERPOLATIONS,
    PairedTransform,
    PairParams,
    apply_params,
    build_transform,
    from_model_space,
    resize_uint8,
    resized_shape,
    sample_params,
    to_model_space,
)

__all__ = [
    "BCI_NAME", "LEVEL_TOKENS", "BCIDataset", "DatasetError", "MISTDataset", "PairedFolderDataset",
    "PairedImageDataset", "PairSizeError", "build_dataset", "check", "dataset_levels", "pair_folders",
    "pair_level_counts", "parse_bci_level", "read_level_csv",
    "INTERPOLATIONS", "PairedTransform", "PairParams", "apply_params", "build_transform", "from_model_space",
    "resize_uint8", "resized_shape", "sample_params", "to_model_space",
]

"""Stain separation: Ruifrok–Johnston colour deconvolution in torch (differentiable) and NumPy."""

from typing import Any

from derestainer.stain.matrices import EPS, HED_FROM_RGB, RGB_FROM_HED, STAINS, stain_index, stain_matrix_from_vectors
from derestainer.stain.numpy_ops import (
    hed_to_rgb_np,
    macenko_stain_matrix,
    rgb_to_hed_np,
    stain_channel_np,
    stain_concentration_np,
)

# The torch functions are imported on first use, so that NumPy-only users (metrics worker processes,
# data generation) do not pay torch's import time.
_TORCH_FUNCTIONS = (
    "hed_to_rgb", "od", "project_hed", "rgb_to_hed", "stain_channel", "stain_channels", "stain_od",
)


def __getattr__(name: str) -> Any:
    if name in _TORCH_FUNCTIONS:
        from derestainer.stain import functional

        return getattr(functional, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EPS",
    "HED_FROM_RGB",
    "RGB_FROM_HED",
    "STAINS",
    "hed_to_rgb",
    "hed_to_rgb_np",
    "macenko_stain_matrix",
    "od",
    "project_hed",
    "rgb_to_hed",
    "rgb_to_hed_np",
    "stain_channel",
    "stain_channel_np",
    "stain_channels",
    "stain_concentration_np",
    "stain_index",
    "stain_matrix_from_vectors",
    "stain_od",
]

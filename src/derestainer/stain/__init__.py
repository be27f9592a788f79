"""Stain separation: Ruifrok–Johnston colour deconvolution in torch (differentiable) and NumPy."""

from .matrices import EPS, HED_FROM_RGB, RGB_FROM_HED, STAINS, stain_index, stain_matrix_from_vectors
from .numpy_ops import (
    hed_to_rgb_np,
    macenko_stain_matrix,
    rgb_to_hed_np,
    stain_channel_np,
    stain_concentration_np,
)

# The torch functions are imported on first use, so that NumPy-only users (metrics worker processes,
# data generation) do not pay torch's import time.
_TORCH_FUNCTIONS = (
    "hed_to_rgb", "model_to_unit", "od", "project_hed", "rgb_to_hed", "stain_channel", "stain_channels", "unit_to_model",
)


def __getattr__(name: str):  # noqa: ANN202 (PEP 562)
    if name in _TORCH_FUNCTIONS:
        from . import functional

        return getattr(functional, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EPS", "HED_FROM_RGB", "RGB_FROM_HED", "STAINS",
    "rgb_to_hed", "hed_to_rgb", "project_hed", "stain_channel", "stain_channels", "od",
    "model_to_unit", "unit_to_model", "stain_index", "stain_matrix_from_vectors",
    "rgb_to_hed_np", "hed_to_rgb_np", "stain_channel_np", "stain_concentration_np", "macenko_stain_matrix",
]

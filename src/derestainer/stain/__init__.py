"""Stain separation: Ruifrok–Johnston colour deconvolution in torch (differentiable) and NumPy."""

from .functional import (
    hed_to_rgb,
    model_to_unit,
    od,
    project_hed,
    rgb_to_hed,
    stain_channel,
    stain_channels,
    unit_to_model,
)
from .matrices import EPS, HED_FROM_RGB, RGB_FROM_HED, STAINS, stain_index, stain_matrix_from_vectors
from .numpy_ops import (
    hed_to_rgb_np,
    macenko_stain_matrix,
    rgb_to_hed_np,
    stain_channel_np,
    stain_concentration_np,
)

__all__ = [
    "EPS", "HED_FROM_RGB", "RGB_FROM_HED", "STAINS",
    "rgb_to_hed", "hed_to_rgb", "project_hed", "stain_channel", "stain_channels", "od",
    "model_to_unit", "unit_to_model", "stain_index", "stain_matrix_from_vectors",
    "rgb_to_hed_np", "hed_to_rgb_np", "stain_channel_np", "stain_concentration_np", "macenko_stain_matrix",
]

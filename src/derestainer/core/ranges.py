"""Value-range conversions between images and model tensors.

Three ranges occur: ``uint8`` images in ``0..255``, model inputs/outputs in ``[-1, 1]``, and stain
separation's ``[0, 1]``. The maps are ``x/127.5 − 1`` and ``round((x+1)·127.5)`` (exact inverses on
``uint8``), and ``(x+1)/2`` / ``2x − 1``. Every conversion in the package goes through these.
"""

from __future__ import annotations

import torch


def uint8_to_signed(image: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``uint8`` (any shape) → float in ``[-1, 1]``: ``x/127.5 − 1``."""
    return image.to(dtype) / 127.5 - 1.0


def signed_to_uint8(image: torch.Tensor) -> torch.Tensor:
    """Float in ``[-1, 1]`` → ``uint8``: ``round((x+1)·127.5)``, clamped; exact inverse of :func:`uint8_to_signed`."""
    return ((image.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round_().to(torch.uint8)


def signed_to_unit(x: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` → ``[0, 1]``: ``(x+1)/2``."""
    return (x + 1.0) * 0.5


def unit_to_signed(x: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` → ``[-1, 1]``: ``2x − 1``."""
    return x * 2.0 - 1.0


def unit_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` → ``uint8``: ``round(255·x)``, clamped."""
    return (x.detach().float().clamp(0.0, 1.0) * 255.0).round_().to(torch.uint8)

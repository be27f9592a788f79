"""SimAM: a simple, parameter-free attention module (Yang et al., ICML 2021), paper §2.2.

Each activation is weighted by ``sigmoid(1/e*)``, the inverse of its minimal energy, computed per
sample and channel over the spatial positions:
``d = (x − μ)²``, ``v = Σd / (HW − 1)``, ``1/e* = d / (4(v + λ)) + 0.5``, ``out = x · sigmoid(1/e*)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def simam(x: torch.Tensor, lam: float = 1e-4) -> torch.Tensor:
    """SimAM attention.

    Args:
        x: ``[N, C, H, W]``.
        lam: the energy regulariser λ (SimAM's default 1e-4).
    Returns:
        ``[N, C, H, W]``.
    """
    if x.dim() != 4:
        raise ValueError(f"simam expects [N, C, H, W], got shape {tuple(x.shape)}")
    # HW − 1 is the unbiased count; a 1×1 map has d = 0, so any positive count gives the same answer.
    n = max(x.shape[2] * x.shape[3] - 1, 1)
    d = (x - x.mean(dim=(2, 3), keepdim=True)).square()
    v = d.sum(dim=(2, 3), keepdim=True) / n
    return x * torch.sigmoid(d / (4.0 * (v + lam)) + 0.5)


class SimAM(nn.Module):
    """Module form of :func:`simam` (no parameters)."""

    def __init__(self, lam: float = 1e-4) -> None:
        super().__init__()
        self.lam = lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return simam(x, self.lam)

    def extra_repr(self) -> str:
        return f"lam={self.lam}"

"""ReStainer (paper §2.3): a decoder symmetric to the DeStainer encoder, tanh output in model space."""

from __future__ import annotations

import torch
import torch.nn as nn

from derestainer.layers.blocks import UpBlock


class ReStainer(nn.Module):
    """``n_up`` up-sampling blocks (widths ``ngf·2^n_up → … → ngf``), then reflect-pad 7×7 conv → tanh.

    Shapes: ``[N, ngf·2^n_up, h, w] -> [N, out_channels, h·2^n_up, w·2^n_up]`` in ``[-1, 1]``.
    """

    def __init__(self, ngf: int = 64, n_up: int = 3, out_channels: int = 3, norm: str = "batch", up_mode: str = "nearest") -> None:
        super().__init__()
        self.up = nn.Sequential(
            *[UpBlock(ngf * 2 ** (i + 1), ngf * 2**i, norm=norm, mode=up_mode) for i in reversed(range(n_up))]
        )
        self.head = nn.Sequential(
            nn.ReflectionPad2d(3),
            nn.Conv2d(ngf, out_channels, 7),
            nn.Tanh(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.up(x))

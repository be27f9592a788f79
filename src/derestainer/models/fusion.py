"""Feature fusion module (paper §2.2): residual blocks of modulated convolutions conditioned on Ŝ."""

from __future__ import annotations

import torch
import torch.nn as nn

from derestainer.layers.modulated_conv import FusedMode, ModulatedConv2d
from derestainer.layers.simam import SimAM


class FusionBlock(nn.Module):
    """``x + SimAM(ModConv(LeakyReLU(ModConv(x, s)), s))``, 3×3 reflection-padded modulated convolutions.

    Shapes: ``forward(x [N, C, H, W], styles [N, style_dim]) -> [N, C, H, W]``.
    """

    def __init__(self, channels: int, style_dim: int = 4, demodulate: bool = True, fused: FusedMode = True) -> None:
        super().__init__()
        self.conv1 = ModulatedConv2d(channels, channels, 3, style_dim=style_dim, demodulate=demodulate, fused=fused)
        self.act = nn.LeakyReLU(0.2)
        self.conv2 = ModulatedConv2d(channels, channels, 3, style_dim=style_dim, demodulate=demodulate, fused=fused)
        self.attn = SimAM()

    def forward(self, x: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.conv2(self.act(self.conv1(x, styles)), styles))


class FeatureFusion(nn.Module):
    """``n_blocks`` :class:`FusionBlock` s sharing the conditioning ``Ŝ`` (each conv has its own affine map).

    Shapes: ``forward(x [N, C, H, W], styles [N, style_dim]) -> [N, C, H, W]``.
    """

    def __init__(self, channels: int, n_blocks: int = 9, style_dim: int = 4, demodulate: bool = True, fused: FusedMode = True) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [FusionBlock(channels, style_dim=style_dim, demodulate=demodulate, fused=fused) for _ in range(n_blocks)]
        )

    def set_fused(self, fused: FusedMode) -> None:
        """Switch every modulated convolution between the grouped and the unfused path."""
        for m in self.modules():
            if isinstance(m, ModulatedConv2d):
                m.fused = fused

    def forward(self, x: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, styles)
        return x

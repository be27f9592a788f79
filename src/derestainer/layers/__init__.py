"""Neural-network building blocks (modulated convolution, SimAM, conv blocks)."""

from .blocks import ConvNormAct, DownBlock, ResidualBlock, UpBlock, make_act, make_norm
from .modulated_conv import ModulatedConv2d, demodulation_coefficients, modulated_conv2d
from .simam import SimAM, simam

__all__ = [
    "ConvNormAct", "DownBlock", "UpBlock", "ResidualBlock", "make_norm", "make_act",
    "ModulatedConv2d", "modulated_conv2d", "demodulation_coefficients",
    "SimAM", "simam",
]

"""Neural-network building blocks (modulated convolution, SimAM, conv blocks)."""

from derestainer.layers.blocks import ConvNormAct, DownBlock, ResidualBlock, UpBlock, make_act, make_norm
from derestainer.layers.modulated_conv import ModulatedConv2d, demodulation_coefficients, modulated_conv2d
from derestainer.layers.simam import SimAM, simam

__all__ = [
    "ConvNormAct",
    "DownBlock",
    "ModulatedConv2d",
    "ResidualBlock",
    "SimAM",
    "UpBlock",
    "demodulation_coefficients",
    "make_act",
    "make_norm",
    "modulated_conv2d",
    "simam",
]

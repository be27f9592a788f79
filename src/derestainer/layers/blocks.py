"""Convolution blocks shared by the generators: conv-norm-act, down/up-sampling, residual.

The layout follows CycleGAN/pix2pix's ResNet generator (zero-padded stride-2 down-sampling,
reflection-padded residual blocks and 7×7 stem/head), which the DeReStainer paper modifies.

Up-sampling is nearest-neighbour ×2 followed by a 3×3 convolution rather than a stride-2 transposed
convolution: a 3×3 kernel at stride 2 overlaps unevenly and prints checkerboard artefacts
(Odena, Dumoulin & Olah, Distill 2016), most visible on flat background and stroma, and they
repeat across every tile of a whole slide. ``UpBlock(mode='transpose')`` keeps the pix2pix variant.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn as nn

NORMS = ("batch", "instance", "none")
#: Norms a generator may use: instance norm is refused (per-tile statistics make seams on whole slides).
GENERATOR_NORMS = ("batch", "none")
#: Padding modes of :class:`torch.nn.Conv2d`.
PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]
ACTS = ("lrelu", "relu", "tanh", "none")


def make_norm(norm: str, channels: int) -> nn.Module:
    """``batch`` → BatchNorm2d, ``instance`` → InstanceNorm2d (discriminators only), ``none`` → Identity."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=False)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def make_act(act: str, negative_slope: float = 0.2) -> nn.Module:
    """``lrelu`` (LeakyReLU, slope 0.2 by default) | ``relu`` | ``tanh`` | ``none``."""
    if act == "lrelu":
        return nn.LeakyReLU(negative_slope, inplace=False)
    if act == "relu":
        return nn.ReLU(inplace=False)
    if act == "tanh":
        return nn.Tanh()
    if act == "none":
        return nn.Identity()
    raise ValueError(f"act must be one of {ACTS}, got {act!r}")


class ConvNormAct(nn.Sequential):
    """Conv2d → norm → activation. The convolution has a bias only when no norm follows it.

    Shapes: ``[N, in_ch, H, W] -> [N, out_ch, ⌊(H + 2p − k)/stride⌋ + 1, …]`` with ``p = k // 2``
    unless ``padding`` is given.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        padding_mode: PaddingMode = "zeros",
        norm: str = "batch",
        act: str = "lrelu",
        negative_slope: float = 0.2,
    ) -> None:
        pad = kernel_size // 2 if padding is None else padding
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=pad, padding_mode=padding_mode,
                      bias=norm == "none"),
            make_norm(norm, out_ch),
            make_act(act, negative_slope),
        )


class DownBlock(ConvNormAct):
    """Halves the resolution: 3×3 stride-2 conv (zero padding 1), norm, LeakyReLU 0.2 (paper §3.1).

    Shapes: ``[N, in_ch, H, W] -> [N, out_ch, ⌈H/2⌉, ⌈W/2⌉]``.
    """

    def __init__(self, in_ch: int, out_ch: int, norm: str = "batch", negative_slope: float = 0.2) -> None:
        super().__init__(in_ch, out_ch, 3, stride=2, padding=1, norm=norm, act="lrelu", negative_slope=negative_slope)


class UpBlock(nn.Sequential):
    """Doubles the resolution: nearest ×2 + 3×3 conv (default) or 3×3 stride-2 transposed conv; norm; LeakyReLU.

    Shapes: ``[N, in_ch, H, W] -> [N, out_ch, 2H, 2W]``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        norm: str = "batch",
        mode: str = "nearest",
        padding_mode: PaddingMode = "zeros",
        negative_slope: float = 0.2,
    ) -> None:
        if mode == "nearest":
            layers: list[nn.Module] = [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(in_ch, out_ch, 3, padding=1, padding_mode=padding_mode, bias=norm == "none"),
            ]
        elif mode == "transpose":
            layers = [nn.ConvTranspose2d(in_ch, out_ch, 3, stride=2, padding=1, output_padding=1, bias=norm == "none")]
        else:
            raise ValueError(f"up-sampling mode must be 'nearest' or 'transpose', got {mode!r}")
        super().__init__(*layers, make_norm(norm, out_ch), make_act("lrelu", negative_slope))


class ResidualBlock(nn.Module):
    """``x + norm(conv(act(norm(conv(x)))))`` with 3×3 reflection-padded convolutions (CycleGAN).

    Shapes: ``[N, C, H, W] -> [N, C, H, W]`` (needs ``H, W ≥ 2`` for reflection padding).
    """

    def __init__(self, channels: int, norm: str = "batch", act: str = "lrelu", padding_mode: PaddingMode = "reflect") -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvNormAct(channels, channels, 3, padding_mode=padding_mode, norm=norm, act=act),
            ConvNormAct(channels, channels, 3, padding_mode=padding_mode, norm=norm, act="none"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@contextlib.contextmanager
def frozen_bn_stats(*modules: nn.Module) -> Iterator[None]:
    """Batch norm keeps normalising with batch statistics but does not update its running statistics.

    Used for the passes of IHC images through an encoder (DeReStainer's IHC branch, ASP's PatchNCE
    passes): only H&E goes through the encoder at inference, so the running statistics must
    describe H&E, not a mixture of H&E and IHC. The batch counters are restored too.
    """
    bns = [m for mod in modules for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in bns]
    try:
        for m in bns:
            m.momentum = 0.0  # running = (1 − 0)·running + 0·batch
        yield
    finally:
        for m, (mom, nbt) in zip(bns, saved):
            m.momentum = mom
            tracked = m.num_batches_tracked
            if nbt is not None and tracked is not None:
                tracked.copy_(nbt)


def check_generator_norm(norm: str) -> None:
    """Raise ``ValueError`` unless ``norm`` is one of :data:`GENERATOR_NORMS` (saying why instance norm is refused)."""
    if norm not in GENERATOR_NORMS:
        raise ValueError(f"generator norm must be one of {GENERATOR_NORMS}, got {norm!r} "
                         "(instance norm uses per-tile statistics and makes seams on whole slides)")

"""Conditional PatchGAN discriminators (pix2pix) and their multi-scale form (pix2pixHD), paper §2.4.

The discriminator sees the H&E and an IHC image (real or generated) stacked as 6 channels and
returns a map of patch logits; with ``n_layers = 3`` each logit sees a 70×70 patch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from derestainer.core.config import D_INPUTS
from derestainer.core.errors import ConfigError
from derestainer.layers.blocks import NORMS, make_norm


class PatchDiscriminator(nn.Module):
    """pix2pix's ``NLayerDiscriminator``: 4×4 convolutions, ``n_layers`` of them at stride 2, then two at stride 1.

    Widths ``ndf·min(2^i, 8)``; LeakyReLU 0.2; no norm after the first conv; raw logits (LSGAN).
    Receptive field: 70 px for ``n_layers = 3``, 34 for 2, 16 for 1.

    Shapes: ``[N, in_channels, H, W] -> [N, 1, H', W']`` with ``H' = H/2^n_layers − 2`` for
    ``H`` divisible by ``2^n_layers``.
    """

    def __init__(self, in_channels: int = 6, ndf: int = 64, n_layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be ≥ 1, got {n_layers}")
        bias = norm != "batch"  # pix2pix: a bias unless batch norm cancels it
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=bias),
                make_norm(norm, ndf * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)
        self.apply(_init_pix2pix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every LeakyReLU (``n_layers + 1`` intermediate maps), then the patch logits.

        pix2pixHD's ``getIntermFeat`` outputs: the feature-matching loss compares all but the last.
        """
        outs: list[torch.Tensor] = []
        for layer in self.model:
            x = layer(x)
            if isinstance(layer, nn.LeakyReLU):
                outs.append(x)
        outs.append(x)
        return outs


def _init_pix2pix(m: nn.Module) -> None:
    # pix2pix's 'normal' initialisation, N(0, 0.02), BatchNorm weights N(1, 0.02).
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def downsample2x(x: torch.Tensor) -> torch.Tensor:
    """pix2pixHD's 3×3 stride-2 average pooling (padding 1, padding not counted): ``[N,C,H,W] -> [N,C,⌈H/2⌉,⌈W/2⌉]``."""
    return F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)


class MultiScaleDiscriminator(nn.Module):
    """``num_scales`` independent :class:`PatchDiscriminator` s, scale ``i`` seeing the input average-pooled ``i`` times.

    ``conditional=True`` (pix2pix, DeReStainer) judges the H&E and the IHC stacked as 6 channels;
    ``False`` (BCIStainer, CUT/ASP) judges the IHC alone.

    ``forward(he, ihc) -> list`` of ``num_scales`` patch-logit maps ``[N, 1, H_i', W_i']``, full
    resolution first (paper: 512 and 256 px). ``forward(he, ihc, features=True)`` returns, per
    scale, :meth:`PatchDiscriminator.features` (intermediate maps, then the logits).
    """

    def __init__(self, in_channels: int = 6, ndf: int = 64, n_layers: int = 3, num_scales: int = 2, norm: str = "batch",
                 conditional: bool = True) -> None:
        super().__init__()
        if num_scales < 1:
            raise ValueError(f"num_scales must be ≥ 1, got {num_scales}")
        self.conditional = conditional
        self.discriminators = nn.ModuleList(
            [PatchDiscriminator(in_channels, ndf, n_layers, norm=norm) for _ in range(num_scales)]
        )

    def forward(self, he: torch.Tensor, ihc: torch.Tensor, features: bool = False) -> list[Any]:
        if he.shape[0] != ihc.shape[0] or he.shape[-2:] != ihc.shape[-2:]:
            raise ValueError(f"he {tuple(he.shape)} and ihc {tuple(ihc.shape)} must have the same batch size and size")
        x = torch.cat([he, ihc], dim=1) if self.conditional else ihc
        outs: list[Any] = []
        for i, d in enumerate(self.discriminators):
            if i:
                x = downsample2x(x)
            assert isinstance(d, PatchDiscriminator)
            outs.append(d.features(x) if features else d(x))
        return outs


def build_discriminator(model_cfg: Any) -> MultiScaleDiscriminator:
    """Multi-scale PatchGAN from ``model_cfg`` (``ndf``, ``d_layers``, ``d_scales``, ``d_input``, ``d_norm``)."""
    if model_cfg.d_input not in D_INPUTS:
        raise ConfigError(f"model.d_input must be one of {', '.join(D_INPUTS)}, got {model_cfg.d_input!r}")
    if model_cfg.d_norm not in NORMS:
        raise ConfigError(f"model.d_norm must be one of {', '.join(NORMS)}, got {model_cfg.d_norm!r}")
    conditional = model_cfg.d_input == "he+ihc"
    return MultiScaleDiscriminator(in_channels=6 if conditional else 3, ndf=model_cfg.ndf, n_layers=model_cfg.d_layers,
                                   num_scales=model_cfg.d_scales, norm=model_cfg.d_norm, conditional=conditional)

"""The ResNet generator of pix2pix / PyramidPix2Pix / pix2pixHD, in this package's generator interface.

Architecture (Johnson et al. 2016, as used by the pytorch-CycleGAN-and-pix2pix code that both
pix2pix with ``--netG resnet_9blocks`` and BCI's PyramidPix2Pix build on):

    reflect-pad 3 → conv 7×7 (ngf) → norm → ReLU
    n_down × [conv 3×3 stride 2 (width ×2) → norm → ReLU]
    n_blocks × residual block at ngf·2^n_down:
        reflect-pad 1 → conv 3×3 → norm → ReLU → [dropout] → reflect-pad 1 → conv 3×3 → norm, + input
    n_down × [transposed conv 3×3 stride 2 (width ÷2) → norm → ReLU]
    reflect-pad 3 → conv 7×7 (3) → tanh

pix2pix / PyramidPix2Pix use ``n_down = 2`` (``resnet_9blocks``); pix2pixHD's global generator is the
same network with ``n_down = 4``. Input and output are RGB in model space ``[-1, 1]``.

Normalisation: BCI's PyramidPix2Pix code trains with ``--norm batch`` (its default) and so does
pix2pix; CycleGAN used instance norm. Batch norm is the default here, because in eval mode it is a
fixed per-channel affine map, while instance norm normalises each tile by its own statistics and
makes seams in whole-slide mosaics (docs/method.md, “Baselines”). ``norm='instance'`` is offered for faithful
pix2pixHD/CycleGAN-style experiments on patches only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from derestainer.layers.blocks import NORMS, make_norm
from derestainer.models.base import GenOutput
from derestainer.models.registry import register_generator


class ResnetBlock(nn.Module):
    """Residual block with reflection padding: ``x + conv(relu(norm(conv(x))))`` (with a final norm).

    Shapes: ``[N, C, H, W] → [N, C, H, W]``.
    """

    def __init__(self, channels: int, norm: str = "batch", dropout: float = 0.0) -> None:
        super().__init__()
        bias = norm != "batch"  # a bias before batch norm is cancelled by its mean subtraction
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=bias),
            make_norm(norm, channels),
            nn.ReLU(True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=bias), make_norm(norm, channels)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """pix2pix's ``resnet_9blocks`` generator (``n_down=2``) or pix2pixHD's global generator (``n_down=4``).

    Args:
        in_channels, out_channels: 3 and 3 for RGB → RGB.
        ngf: width of the first layer; the residual blocks run at ``ngf · 2**n_down``.
        n_down: stride-2 down-sampling (and as many up-sampling) stages.
        n_blocks: residual blocks at the bottleneck (pix2pix: 9).
        norm: ``batch`` (default, BCI's choice) | ``instance`` | ``none``.
        dropout: dropout probability inside each residual block (pix2pix/BCI train with 0.5).

    ``forward(he, ihc=None)``: ``he`` ``[N, 3, H, W]`` in ``[-1, 1]`` with ``H, W`` divisible by
    ``2**n_down`` → :class:`GenOutput` with ``ihc`` ``[N, 3, H, W]`` in ``[-1, 1]`` and no level logits
    or H-embeddings (the model has neither). ``ihc`` is accepted for interface parity and ignored.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        ngf: int = 64,
        n_down: int = 2,
        n_blocks: int = 9,
        norm: str = "batch",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
        if ngf < 1 or n_down < 0 or n_blocks < 0:
            raise ValueError(f"invalid sizes ngf={ngf}, n_down={n_down}, n_blocks={n_blocks}")
        bias = norm != "batch"
        self.n_down = n_down
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, ngf, 7, bias=bias),
            make_norm(norm, ngf),
            nn.ReLU(True),
        ]
        ch = ngf
        for _ in range(n_down):
            layers += [nn.Conv2d(ch, ch * 2, 3, stride=2, padding=1, bias=bias), make_norm(norm, ch * 2), nn.ReLU(True)]
            ch *= 2
        layers += [ResnetBlock(ch, norm=norm, dropout=dropout) for _ in range(n_blocks)]
        for _ in range(n_down):
            layers += [
                nn.ConvTranspose2d(ch, ch // 2, 3, stride=2, padding=1, output_padding=1, bias=bias),
                make_norm(norm, ch // 2),
                nn.ReLU(True),
            ]
            ch //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, out_channels, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, he: torch.Tensor, ihc: torch.Tensor | None = None) -> GenOutput:
        m = 2**self.n_down
        if he.shape[-1] % m or he.shape[-2] % m:
            raise ValueError(f"input size {tuple(he.shape[-2:])} must be divisible by {m} (2**n_down)")
        return GenOutput(ihc=self.net(he))


def init_weights(module: nn.Module, gain: float = 0.02) -> None:
    """pix2pix's ``init_type='normal'``: conv weights ~ N(0, gain), norm scales ~ N(1, gain), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)


def build_resnet_generator(model_cfg: Any, dropout: float = 0.0) -> ResnetGenerator:
    """A :class:`ResnetGenerator` from a :class:`~derestainer.core.config.ModelConfig`.

    Uses ``ngf``, ``n_down``, ``norm`` and ``n_fusion_blocks`` (as the number of residual blocks,
    the bottleneck's counterpart of DeReStainer's fusion blocks).
    """
    return ResnetGenerator(
        ngf=model_cfg.ngf,
        n_down=model_cfg.n_down,
        n_blocks=model_cfg.n_fusion_blocks,
        norm=model_cfg.norm,
        dropout=dropout,
    )


@register_generator("pix2pix")
def build_pix2pix(model_cfg: Any) -> ResnetGenerator:
    """pix2pix (Isola et al. 2017) with the ResNet-9-block generator; dropout 0.5 as its code trains it."""
    return build_resnet_generator(model_cfg, dropout=0.5)


@register_generator("pyramidpix2pix")
def build_pyramidpix2pix(model_cfg: Any) -> ResnetGenerator:
    """PyramidPix2Pix (Liu et al., BCI 2022): the pix2pix generator; it differs only by its pyramid loss."""
    return build_resnet_generator(model_cfg, dropout=0.5)


@register_generator("pix2pixhd")
def build_pix2pixhd(model_cfg: Any) -> ResnetGenerator:
    """pix2pixHD (Wang et al. 2018): the global generator (set ``n_down: 4``), no dropout."""
    return build_resnet_generator(model_cfg, dropout=0.0)

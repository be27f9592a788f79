"""PyramidPix2Pix's multi-scale Gaussian-pyramid L1 (Liu et al., BCI, CVPR-W 2022)."""

from __future__ import annotations

import torch

from derestainer.losses.elementary import fp32, gaussian_kernel1d, sep_filter

#: PyramidPix2Pix's blur: kornia ``gaussian_blur2d(x, (3, 3), (1, 1))`` with reflection padding.
_PYR_TAPS = 3
_PYR_SIGMA = 1.0
_PYR_BLURS = 4


def gaussian_pyramid(x: torch.Tensor, levels: int = 4) -> list[torch.Tensor]:
    """PyramidPix2Pix's Gaussian pyramid: level 0 is ``x``; each next level blurs the previous one four
    times with a 3×3 Gaussian (σ 1, reflection padding) and keeps every other pixel.

    Returns ``levels`` tensors ``[N, C, ⌈H/2^l⌉, ⌈W/2^l⌉]``.
    """
    k = gaussian_kernel1d(_PYR_TAPS, _PYR_SIGMA, x.device, x.dtype)
    out = [x]
    for _ in range(levels - 1):
        y = out[-1]
        for _ in range(_PYR_BLURS):
            y = sep_filter(y, k, padding="reflect")
        out.append(y[..., ::2, ::2])
    return out


@fp32
def pyramid_l1_loss(fake: torch.Tensor, real: torch.Tensor, levels: int = 4) -> torch.Tensor:
    """Multi-scale Gaussian-pyramid L1 of PyramidPix2Pix (Liu et al., BCI, CVPR-W 2022): ``Σ_l L1(G_l(ŷ), G_l(y))``.

    Their code (``--pattern L1_L2_L3_L4``) weights every level, the full-resolution L1 included,
    by the same 25 (``lambda_L1 = weight_L2 = weight_L3 = weight_L4 = 25``); here the levels are
    summed with weight 1 and the common factor is ``LossConfig.pyramid`` (25 reproduces theirs).
    """
    with torch.no_grad():
        pr = gaussian_pyramid(real, levels)
    return torch.stack([(f - r).abs().mean() for f, r in zip(gaussian_pyramid(fake, levels), pr)]).sum()



"""Adversarial objectives (LSGAN, original GAN) over one or several discriminator scales, and
pix2pixHD's discriminator feature matching.

``smooth`` (``loss.gan_smooth``; BCIStainer: 0.1) is BCIStainer's random label smoothing: every
target of every patch logit is drawn afresh, real ``1 − U(0, smooth)``, fake ``U(0, smooth)``,
for the discriminator and for the generator (which aims at the smoothed real target). 0 (the
default) gives the plain targets 1 and 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from derestainer.losses.elementary import fp32

Outputs = torch.Tensor | Sequence[torch.Tensor]


def _as_list(x: Outputs) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def _target(like: torch.Tensor, real: bool, smooth: float) -> torch.Tensor:
    """The target of every logit of ``like``: 1 / 0, or with ``smooth > 0`` the randomly smoothed one."""
    if smooth <= 0:
        return torch.ones_like(like) if real else torch.zeros_like(like)
    noise = torch.rand_like(like) * smooth
    return 1.0 - noise if real else noise


def _scales(real: list[torch.Tensor], fake: list[torch.Tensor], name: str) -> None:
    if len(real) != len(fake) or not real:
        raise ValueError(f"{name}: {len(real)} real and {len(fake)} fake scales")


@fp32
def lsgan_d_loss(real_outputs: Outputs, fake_outputs: Outputs, smooth: float = 0.0) -> torch.Tensor:
    """LSGAN discriminator loss, ``½(mean (D(real) − 1)² + mean D(fake)²)``, mean over scales (pix2pix's ½)."""
    real, fake = _as_list(real_outputs), _as_list(fake_outputs)
    _scales(real, fake, "lsgan_d_loss")
    return torch.stack([0.5 * ((r - _target(r, True, smooth)).square().mean() + (f - _target(f, False, smooth)).square().mean())
                        for r, f in zip(real, fake)]).mean()


@fp32
def lsgan_g_loss(fake_outputs: Outputs, smooth: float = 0.0) -> torch.Tensor:
    """LSGAN generator loss, ``mean (D(fake) − 1)²``, mean over scales (L_GAN)."""
    fake = _as_list(fake_outputs)
    if not fake:
        raise ValueError("lsgan_g_loss: no discriminator outputs")
    return torch.stack([(f - _target(f, True, smooth)).square().mean() for f in fake]).mean()


@fp32
def vanilla_d_loss(real_outputs: Outputs, fake_outputs: Outputs, smooth: float = 0.0) -> torch.Tensor:
    """Original GAN (BCE on logits) discriminator loss, ``½(BCE(D(real), 1) + BCE(D(fake), 0))``, mean over scales."""
    real, fake = _as_list(real_outputs), _as_list(fake_outputs)
    _scales(real, fake, "vanilla_d_loss")
    bce = F.binary_cross_entropy_with_logits
    return torch.stack(
        [0.5 * (bce(r, _target(r, True, smooth)) + bce(f, _target(f, False, smooth))) for r, f in zip(real, fake)]
    ).mean()


@fp32
def vanilla_g_loss(fake_outputs: Outputs, smooth: float = 0.0) -> torch.Tensor:
    """Original GAN generator loss (non-saturating), ``BCE(D(fake), 1)``, mean over scales."""
    fake = _as_list(fake_outputs)
    if not fake:
        raise ValueError("vanilla_g_loss: no discriminator outputs")
    return torch.stack([F.binary_cross_entropy_with_logits(f, _target(f, True, smooth)) for f in fake]).mean()


#: GAN objectives by ``LossConfig.gan_mode``: (discriminator loss, generator loss).
GAN_LOSSES: dict[str, tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]] = {
    "lsgan": (lsgan_d_loss, lsgan_g_loss),
    "vanilla": (vanilla_d_loss, vanilla_g_loss),
}


def gan_losses(mode: str) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """``(d_loss, g_loss)`` for ``mode`` ('lsgan' — DeReStainer, pix2pixHD, BCIStainer — or 'vanilla' — pix2pix, BCI's PyramidPix2Pix)."""
    try:
        return GAN_LOSSES[mode]
    except KeyError:
        raise ValueError(f"unknown loss.gan_mode {mode!r}; choose one of {sorted(GAN_LOSSES)}") from None


def gan_d_loss(mode: str, real_outputs: Outputs, fake_outputs: Outputs, smooth: float = 0.0) -> torch.Tensor:
    """The discriminator loss of ``mode`` (see :func:`gan_losses`)."""
    return gan_losses(mode)[0](real_outputs, fake_outputs, smooth=smooth)


def gan_g_loss(mode: str, fake_outputs: Outputs, smooth: float = 0.0) -> torch.Tensor:
    """The generator's adversarial loss of ``mode`` (see :func:`gan_losses`)."""
    return gan_losses(mode)[1](fake_outputs, smooth=smooth)


@fp32
def feature_matching_loss(
    fake_feats: Sequence[Sequence[torch.Tensor]], real_feats: Sequence[Sequence[torch.Tensor]]
) -> torch.Tensor:
    """pix2pixHD's discriminator feature matching, without its ``lambda_feat`` (``loss.fm``, theirs 10):

    ``Σ_scales Σ_layers (1 / num_D) · (4 / (n_layers_D + 1)) · mean |D_l(he, ŷ) − D_l(he, y)|``

    over the intermediate feature maps of every scale (the final patch logits excluded). Their
    ``4 / (n_layers_D + 1)`` is ``4 / L`` for the ``L = n_layers_D + 1`` intermediate layers that
    each scale has; it is written so here, which is the same for their discriminator.

    Args:
        fake_feats, real_feats: per scale, the list of intermediate maps (real ones are detached here).
    """
    if len(fake_feats) != len(real_feats) or not fake_feats:
        raise ValueError(f"feature_matching_loss: {len(fake_feats)} fake and {len(real_feats)} real scales")
    total = fake_feats[0][0].new_zeros((), dtype=torch.float32)
    for f_scale, r_scale in zip(fake_feats, real_feats):
        if len(f_scale) != len(r_scale) or not f_scale:
            raise ValueError("feature_matching_loss: the scales' layer counts differ between real and fake")
        for f, r in zip(f_scale, r_scale):
            total = total + (4.0 / len(f_scale)) * (f - r.detach()).abs().mean()
    return total / len(fake_feats)

"""Losses of DeReStainer (paper §2.4) and of the baselines, one small function each.

Images are in model space ``[-1, 1]`` unless a docstring says otherwise. Every loss is computed with
autocast off and half-precision inputs promoted to float32: SSIM and the stain transform lose too
much precision in bf16.

Overall objective (paper §2.4, weights §3.1, see :func:`generator_losses`)::

    L = stain·(h·L_H + dab·L_DAB) + content·(ssim·L_ssim + mae·L_mae + cmp·L_cmp)
        + level·L_level + gan·L_GAN  (+ pyramid·L_pyr + l1·L_1 for the baselines)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn.functional as F

from derestainer.core.ranges import signed_to_unit
from derestainer.stain import stain_channel

if TYPE_CHECKING:  # only a type here; importing derestainer.models would import every built-in model
    from derestainer.models.base import GenOutput

_F = TypeVar("_F", bound=Callable[..., torch.Tensor])


def _fp32(fn: _F) -> _F:
    """Run ``fn`` with autocast off and its half-precision tensor arguments (and lists of them) in float32."""

    def cast(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dtype in (torch.float16, torch.bfloat16):
            return v.float()
        if isinstance(v, (list, tuple)) and v and all(isinstance(t, torch.Tensor) for t in v):
            return [cast(t) for t in v]
        return v

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        flat = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else [a])]
        dev = next((t.device.type for t in flat if isinstance(t, torch.Tensor)), "cpu")
        with torch.autocast(device_type=dev, enabled=False):
            return fn(*[cast(a) for a in args], **{k: cast(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Elementary losses
# --------------------------------------------------------------------------------------------------


@_fp32
def cosine_loss(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``mean_n (1 − cos(a_n, b_n))`` over the batch (L_H, L_cmp). ``a``, ``b``: ``[N, …]`` (flattened per sample)."""
    if a.shape != b.shape:
        raise ValueError(f"cosine_loss: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    return (1.0 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=eps)).mean()


@_fp32
def mae_loss(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean absolute error in model space (L_mae; also pix2pix's L1)."""
    return (fake - real).abs().mean()


@_fp32
def dab_l1_loss(fake: torch.Tensor, real: torch.Tensor, rgb_from_hed: torch.Tensor | None = None) -> torch.Tensor:
    """``L_DAB = mean |DAB(ŷ) − DAB(y)|`` on DAB channel images ``T⁻¹(T(x)·P_DAB)`` in ``[0, 1]`` (paper §2.3).

    Args:
        fake, real: ``[N, 3, H, W]`` in model space.
        rgb_from_hed: stain matrix (default Ruifrok); pass the generator's own to stay consistent.
    """
    dab_fake = stain_channel(signed_to_unit(fake), "dab", rgb_from_hed=rgb_from_hed)
    with torch.no_grad():
        dab_real = stain_channel(signed_to_unit(real), "dab", rgb_from_hed=rgb_from_hed)
    return (dab_fake - dab_real).abs().mean()


def gaussian_kernel1d(
    size: int = 11, sigma: float = 1.5, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Normalised 1-d Gaussian taps ``[size]`` centred on the middle tap."""
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return (g / g.sum()).to(dtype)


def _sep_filter(x: torch.Tensor, k: torch.Tensor, padding: str | None = None) -> torch.Tensor:
    """Separable depthwise filtering of ``[N, C, H, W]`` with 1-d taps ``k``; 'valid' unless ``padding`` is a pad mode."""
    c, r = x.shape[1], k.numel() // 2
    if padding is not None:
        x = F.pad(x, [r, r, r, r], mode=padding)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


@_fp32
def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) with a Gaussian window, mean over channels and valid positions.

    Equals ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range, channel_axis=…)``: scikit-image averages only
    over positions whose window lies inside the image, i.e. a 'valid' filter here.

    Args:
        x, y: ``[N, C, H, W]`` with ``H, W ≥ win_size``.
    Returns:
        ``[N]``.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim expects two [N, C, H, W] tensors of the same shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"ssim: images of {tuple(x.shape[-2:])} px are smaller than the {win_size}-px window")
    k = gaussian_kernel1d(win_size, sigma, x.device, x.dtype)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = _sep_filter(x, k), _sep_filter(y, k)
    sxx = _sep_filter(x * x, k) - mu_x * mu_x
    syy = _sep_filter(y * y, k) - mu_y * mu_y
    sxy = _sep_filter(x * y, k) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.mean(dim=(1, 2, 3))


@_fp32
def ssim_loss(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``L_ssim = 1 − SSIM`` (Gaussian window 11, σ 1.5) of the images mapped to ``[0, 1]``, mean over the batch.

    Args:
        fake, real: ``[N, 3, H, W]`` in model space.
    """
    return 1.0 - ssim(signed_to_unit(fake), signed_to_unit(real), data_range=1.0).mean()


@_fp32
def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, ignore_index: int = -1) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) ``−(1 − p_t)^γ log p_t``, mean over samples whose target is not ``ignore_index``.

    ``gamma = 0`` is the cross entropy. With no valid sample the result is 0 (still attached to the
    graph, so every rank of a distributed run sees the same parameters used).

    Args:
        logits: ``[N, K]``. target: ``[N]`` integer classes, ``ignore_index`` for unknown.
    Returns:
        scalar.
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"focal_loss expects logits [N, K] and target [N], got {tuple(logits.shape)}, {tuple(target.shape)}")
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target)).long()
    logp = F.log_softmax(logits, dim=1).gather(1, t[:, None]).squeeze(1)
    loss = -((1.0 - logp.exp()).clamp_min(0.0) ** gamma) * logp if gamma else -logp
    w = valid.to(loss.dtype)
    return (loss * w).sum() / w.sum().clamp_min(1.0)


def _as_list(x: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


@_fp32
def lsgan_d_loss(real_outputs: torch.Tensor | Sequence[torch.Tensor], fake_outputs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """LSGAN discriminator loss, ``½(mean (D(real) − 1)² + mean D(fake)²)``, mean over scales (pix2pix's ½)."""
    real, fake = _as_list(real_outputs), _as_list(fake_outputs)
    if len(real) != len(fake) or not real:
        raise ValueError(f"lsgan_d_loss: {len(real)} real and {len(fake)} fake scales")
    return torch.stack([0.5 * ((r - 1).square().mean() + f.square().mean()) for r, f in zip(real, fake)]).mean()


@_fp32
def lsgan_g_loss(fake_outputs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """LSGAN generator loss, ``mean (D(fake) − 1)²``, mean over scales (L_GAN)."""
    fake = _as_list(fake_outputs)
    if not fake:
        raise ValueError("lsgan_g_loss: no discriminator outputs")
    return torch.stack([(f - 1).square().mean() for f in fake]).mean()


@_fp32
def vanilla_d_loss(real_outputs: torch.Tensor | Sequence[torch.Tensor], fake_outputs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Original GAN (BCE on logits) discriminator loss, ``½(BCE(D(real), 1) + BCE(D(fake), 0))``, mean over scales."""
    real, fake = _as_list(real_outputs), _as_list(fake_outputs)
    if len(real) != len(fake) or not real:
        raise ValueError(f"vanilla_d_loss: {len(real)} real and {len(fake)} fake scales")
    bce = F.binary_cross_entropy_with_logits
    return torch.stack(
        [0.5 * (bce(r, torch.ones_like(r)) + bce(f, torch.zeros_like(f))) for r, f in zip(real, fake)]
    ).mean()


@_fp32
def vanilla_g_loss(fake_outputs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Original GAN generator loss (non-saturating), ``BCE(D(fake), 1)``, mean over scales."""
    fake = _as_list(fake_outputs)
    if not fake:
        raise ValueError("vanilla_g_loss: no discriminator outputs")
    return torch.stack([F.binary_cross_entropy_with_logits(f, torch.ones_like(f)) for f in fake]).mean()


#: GAN objectives by ``LossConfig.gan_mode``: (discriminator loss, generator loss).
GAN_LOSSES: dict[str, tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]] = {
    "lsgan": (lsgan_d_loss, lsgan_g_loss),
    "vanilla": (vanilla_d_loss, vanilla_g_loss),
}


def gan_losses(mode: str) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """``(d_loss, g_loss)`` for ``mode`` ('lsgan' — DeReStainer, pix2pixHD — or 'vanilla' — pix2pix, BCI's PyramidPix2Pix)."""
    try:
        return GAN_LOSSES[mode]
    except KeyError:
        raise ValueError(f"unknown loss.gan_mode {mode!r}; choose one of {sorted(GAN_LOSSES)}") from None


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
            y = _sep_filter(y, k, padding="reflect")
        out.append(y[..., ::2, ::2])
    return out


@_fp32
def pyramid_l1_loss(fake: torch.Tensor, real: torch.Tensor, levels: int = 4) -> torch.Tensor:
    """Multi-scale Gaussian-pyramid L1 of PyramidPix2Pix (Liu et al., BCI, CVPR-W 2022): ``Σ_l L1(G_l(ŷ), G_l(y))``.

    Their code (``--pattern L1_L2_L3_L4``) weights every level, the full-resolution L1 included,
    by the same 25 (``lambda_L1 = weight_L2 = weight_L3 = weight_L4 = 25``); here the levels are
    summed with weight 1 and the common factor is ``LossConfig.pyramid`` (25 reproduces theirs).
    """
    with torch.no_grad():
        pr = gaussian_pyramid(real, levels)
    return torch.stack([(f - r).abs().mean() for f, r in zip(gaussian_pyramid(fake, levels), pr)]).sum()


# --------------------------------------------------------------------------------------------------
# The generator objective
# --------------------------------------------------------------------------------------------------

#: Term name → the LossConfig fields whose product is its weight.
TERM_WEIGHTS: dict[str, tuple[str, ...]] = {
    "h": ("stain", "h"),
    "dab": ("stain", "dab"),
    "ssim": ("content", "ssim"),
    "mae": ("content", "mae"),
    "cmp": ("content", "cmp"),
    "level": ("level",),
    "gan": ("gan",),
    "pyramid": ("pyramid",),
    "l1": ("l1",),
}


def term_weights(loss_cfg: Any) -> dict[str, float]:
    """Effective weight of every term, e.g. ``{'h': stain·h, 'mae': content·mae, …}``."""
    out = {}
    for name, fields in TERM_WEIGHTS.items():
        w = 1.0
        for f in fields:
            w *= float(getattr(loss_cfg, f))
        out[name] = w
    return out


def active_terms(loss_cfg: Any) -> set[str]:
    """Terms with a non-zero weight; lets a trainer skip the discriminator, comparator or IHC branch."""
    return {k for k, w in term_weights(loss_cfg).items() if w != 0.0}


def generator_losses(
    out: GenOutput,
    he: torch.Tensor,
    ihc: torch.Tensor,
    level: torch.Tensor | None,
    d_fake_outputs: Sequence[torch.Tensor] | torch.Tensor | None,
    cmp_feats_fake: torch.Tensor | None,
    cmp_feats_real: torch.Tensor | None,
    cfg: Any,
    rgb_from_hed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The generator's total loss and its terms.

    Args:
        out: the generator's output (``out.ihc`` in model space).
        he: ``[N, 3, H, W]`` input H&E (unused by the current terms, kept for conditional extensions).
        ihc: ``[N, 3, H, W]`` real IHC, model space.
        level: ``[N]`` HER2 level, −1 unknown (ignored); ``None`` skips L_level.
        d_fake_outputs: discriminator outputs on (he, generated) per scale; ``None`` skips L_GAN.
        cmp_feats_fake, cmp_feats_real: comparator features of generated/real IHC; ``None`` skips L_cmp.
        cfg: a :class:`~derestainer.core.config.LossConfig`.
        rgb_from_hed: stain matrix for L_DAB (pass the generator's, e.g. ``G.destainer.separation.rgb_from_hed``).
    Returns:
        ``(total, terms)``: ``total`` a scalar with graph; ``terms`` maps each *computed* term
        (``h, dab, ssim, mae, cmp, level, gan, pyramid, l1``) to its **unweighted** value, detached,
        plus ``'total'``. A term whose weight is 0 or whose inputs are missing is neither computed nor listed.
    """
    w = term_weights(cfg)
    fake = out.ihc
    computations: dict[str, Callable[[], torch.Tensor] | None] = {
        "h": (lambda: cosine_loss(out.h_embed_he, out.h_embed_ihc))  # type: ignore[arg-type]
        if out.h_embed_he is not None and out.h_embed_ihc is not None else None,
        "dab": lambda: dab_l1_loss(fake, ihc, rgb_from_hed),
        "ssim": lambda: ssim_loss(fake, ihc),
        "mae": lambda: mae_loss(fake, ihc),
        "cmp": (lambda: cosine_loss(cmp_feats_fake, cmp_feats_real))
        if cmp_feats_fake is not None and cmp_feats_real is not None else None,
        "level": (lambda: focal_loss(out.level_logits, level, gamma=cfg.focal_gamma))  # type: ignore[arg-type]
        if out.level_logits is not None and level is not None else None,
        "gan": (lambda: gan_losses(cfg.gan_mode)[1](d_fake_outputs)) if d_fake_outputs is not None else None,
        "pyramid": lambda: pyramid_l1_loss(fake, ihc, cfg.pyramid_levels),
        "l1": lambda: mae_loss(fake, ihc),
    }
    total = fake.new_zeros((), dtype=torch.float32)
    terms: dict[str, torch.Tensor] = {}
    for name, compute in computations.items():
        if w[name] == 0.0 or compute is None:
            continue
        value = compute()
        total = total + w[name] * value
        terms[name] = value.detach()
    terms["total"] = total.detach()
    return total, terms


class GeneratorLoss:
    """:func:`generator_losses` bound to a :class:`~derestainer.core.config.LossConfig` (and a stain matrix).

    ``loss(out, he, ihc, level=None, d_fake_outputs=None, cmp_feats_fake=None, cmp_feats_real=None)
    -> (total, terms)``; ``loss.active`` is the set of terms with a non-zero weight.
    """

    def __init__(self, loss_cfg: Any, rgb_from_hed: torch.Tensor | None = None) -> None:
        self.cfg = loss_cfg
        self.rgb_from_hed = rgb_from_hed
        self.active = active_terms(loss_cfg)
        self.weights = term_weights(loss_cfg)

    def __call__(
        self,
        out: GenOutput,
        he: torch.Tensor,
        ihc: torch.Tensor,
        level: torch.Tensor | None = None,
        d_fake_outputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
        cmp_feats_fake: torch.Tensor | None = None,
        cmp_feats_real: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return generator_losses(out, he, ihc, level, d_fake_outputs, cmp_feats_fake, cmp_feats_real, self.cfg, self.rgb_from_hed)

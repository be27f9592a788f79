"""Elementary losses, one small function each (images in model space ``[-1, 1]`` unless said otherwise).

Every loss runs with autocast off and half-precision inputs promoted to float32 (:func:`fp32`): SSIM
and the stain transform lose too much precision in bf16.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from derestainer.core.ranges import signed_to_unit
from derestainer.stain import stain_channel

_F = TypeVar("_F", bound=Callable[..., torch.Tensor])


def fp32(fn: _F) -> _F:
    """Run ``fn`` with autocast off and its half-precision tensor arguments (and nested lists of them) in float32."""

    def cast(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dtype in (torch.float16, torch.bfloat16):
            return v.float()
        if isinstance(v, (list, tuple)):
            return [cast(t) for t in v]
        return v

    def first_device(v: Any) -> str | None:
        if isinstance(v, torch.Tensor):
            return v.device.type
        if isinstance(v, (list, tuple)):
            return next((d for d in map(first_device, v) if d is not None), None)
        return None

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        dev = first_device([*args, *kwargs.values()]) or "cpu"
        with torch.autocast(device_type=dev, enabled=False):
            return fn(*[cast(a) for a in args], **{k: cast(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]


@fp32
def cosine_loss(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``mean_n (1 − cos(a_n, b_n))`` over the batch (L_H, L_cmp). ``a``, ``b``: ``[N, …]`` (flattened per sample)."""
    if a.shape != b.shape:
        raise ValueError(f"cosine_loss: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    return (1.0 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=eps)).mean()


@fp32
def mae_loss(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean absolute error in model space (L_mae; also pix2pix's L1)."""
    return (fake - real).abs().mean()


@fp32
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


def sep_filter(x: torch.Tensor, k: torch.Tensor, padding: str | None = None) -> torch.Tensor:
    """Separable depthwise filtering of ``[N, C, H, W]`` with 1-d taps ``k``; 'valid' unless ``padding`` is a pad mode."""
    c, r = x.shape[1], k.numel() // 2
    if padding is not None:
        x = F.pad(x, [r, r, r, r], mode=padding)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


@fp32
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
    mu_x, mu_y = sep_filter(x, k), sep_filter(y, k)
    sxx = sep_filter(x * x, k) - mu_x * mu_x
    syy = sep_filter(y * y, k) - mu_y * mu_y
    sxy = sep_filter(x * y, k) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.mean(dim=(1, 2, 3))


@fp32
def ssim_loss(fake: torch.Tensor, real: torch.Tensor, win_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """``L_ssim = 1 − SSIM`` (Gaussian window ``win_size``, σ ``sigma``) of the images mapped to ``[0, 1]``, mean over the batch.

    The paper's window is 11 px at σ 1.5 (scikit-image's, as the metric); BCIStainer trains with
    piqa's 9 px at σ 2.375 (``loss.ssim_win``, ``loss.ssim_sigma``).

    Args:
        fake, real: ``[N, 3, H, W]`` in model space.
    """
    return 1.0 - ssim(signed_to_unit(fake), signed_to_unit(real), data_range=1.0, win_size=win_size, sigma=sigma).mean()


@fp32
def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    ignore_index: int = -1,
    alpha: Sequence[float] | None = None,
) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) ``−α_t (1 − p_t)^γ log p_t``, mean over samples whose target is not ``ignore_index``.

    ``gamma = 0`` and no ``alpha`` is the cross entropy. ``alpha``: one weight per class (BCIStainer:
    0.5, 0.2, 0.2, 0.1 for 0, 1+, 2+, 3+), the mean then still divides by the number of samples, as
    theirs does. With no valid sample the result is 0 (still attached to the graph, so every rank
    of a distributed run sees the same parameters used).

    Args:
        logits: ``[N, K]``. target: ``[N]`` integer classes, ``ignore_index`` for unknown.
    Returns:
        scalar.
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"focal_loss expects logits [N, K] and target [N], got {tuple(logits.shape)}, {tuple(target.shape)}")
    if alpha is not None and len(alpha) != logits.shape[1]:
        raise ValueError(f"focal_loss: {len(alpha)} class weights (alpha) for {logits.shape[1]} classes")
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target)).long()
    logp = F.log_softmax(logits, dim=1).gather(1, t[:, None]).squeeze(1)
    loss = -((1.0 - logp.exp()).clamp_min(0.0) ** gamma) * logp if gamma else -logp
    if alpha is not None:
        loss = loss * torch.tensor(alpha, dtype=loss.dtype, device=loss.device)[t]
    w = valid.to(loss.dtype)
    return (loss * w).sum() / w.sum().clamp_min(1.0)

"""Differentiable Ruifrok–Johnston colour deconvolution in pure torch (paper eq. 1–2; docs/method.md, “Stain separation”).

All functions take ``[N, 3, H, W]`` (or ``[3, H, W]``) RGB in ``[0, 1]`` on any device and float
dtype. They always compute in float32 (float64 for a float64 input) with autocast disabled, and
return that dtype: under bf16 autocast or for a bf16 input, ``exp(−13.8·hed @ M)`` would amplify
bf16's 0.4 % rounding to several grey levels, so training, inference and metrics share one
fp32 rule (docs/method.md, “Stain separation”). They are differentiable with finite gradients everywhere, including pure white, pure black
and saturated pixels (the logarithm's argument is clamped at ``EPS`` and clamps have zero,
not infinite, gradient outside their range).

Stain matrices are ``[3, 3]`` with one stain per row (``rgb_from_hed``); ``hed_from_rgb`` is
its inverse. Defaults are Ruifrok's, identical to scikit-image.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from derestainer.stain.matrices import EPS, HED_FROM_RGB, LOG_ADJUST, RGB_FROM_HED, stain_index

Matrix = "torch.Tensor | np.ndarray | None"


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the stain code computes (and returns) in for input ``x``: float64 stays, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def no_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    """Autocast off on ``x``'s device (nothing to turn off where that device type has no autocast, e.g. meta)."""
    available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
    if available(x.device.type) if available is not None else x.device.type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def _as_matrix(m: torch.Tensor | np.ndarray | None, default: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    if m is None:
        m = default
    if isinstance(m, np.ndarray):
        m = torch.from_numpy(m)
    return m.to(device=like.device, dtype=like.dtype)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    if x.dim() not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"expected an RGB tensor [N,3,H,W] or [3,H,W], got shape {tuple(x.shape)}")
    return x.movedim(-3, -1)


def _matmul(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # x is channels-first; contract its channel axis with the matrix rows.
    return torch.einsum("...chw,cd->...dhw", x, m)


def rgb_to_hed(rgb: torch.Tensor, hed_from_rgb: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
    """``T(rgb)``: stain concentrations, ``max(log(max(rgb, EPS)) / log(EPS) @ hed_from_rgb, 0)``.

    Args:
        rgb: ``[N, 3, H, W]`` or ``[3, H, W]`` float in ``[0, 1]``.
        hed_from_rgb: ``[3, 3]`` inverse stain matrix (default: Ruifrok, as scikit-image).
    Returns:
        Same shape, channels H, E, DAB; non-negative.
    """
    if not rgb.is_floating_point():
        raise TypeError("rgb_to_hed expects a float tensor in [0, 1]; convert uint8 with x.float() / 255")
    _channels_last(rgb)  # shape check
    with no_autocast(rgb):
        return _rgb_to_hed(rgb.to(compute_dtype(rgb)), hed_from_rgb)


def _rgb_to_hed(rgb: torch.Tensor, hed_from_rgb: torch.Tensor | np.ndarray | None) -> torch.Tensor:
    m = _as_matrix(hed_from_rgb, HED_FROM_RGB, rgb)
    od = torch.log(rgb.clamp_min(EPS)) / LOG_ADJUST
    return _matmul(od, m).clamp_min(0.0)


def hed_to_rgb(hed: torch.Tensor, rgb_from_hed: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
    """``T⁻¹(hed)``: ``clip(exp(-(hed · -log(EPS)) @ rgb_from_hed), 0, 1)``.

    Args:
        hed: ``[N, 3, H, W]`` or ``[3, H, W]`` stain concentrations.
        rgb_from_hed: ``[3, 3]`` stain matrix, one stain per row (default: Ruifrok).
    Returns:
        RGB in ``[0, 1]``, same shape.
    """
    _channels_last(hed)
    with no_autocast(hed):
        return _hed_to_rgb(hed.to(compute_dtype(hed)), rgb_from_hed)


def _hed_to_rgb(hed: torch.Tensor, rgb_from_hed: torch.Tensor | np.ndarray | None) -> torch.Tensor:
    m = _as_matrix(rgb_from_hed, RGB_FROM_HED, hed)
    log_rgb = _matmul(hed * LOG_ADJUST, m)  # = -(hed * -log(EPS)) @ m
    return torch.exp(log_rgb).clamp(0.0, 1.0)


def project_hed(hed: torch.Tensor, stain: str) -> torch.Tensor:
    """``hed · P_k``: keep one stain's concentration, zero the other two (paper eq. 2)."""
    k = stain_index(stain)
    mask = torch.zeros(3, dtype=hed.dtype, device=hed.device)
    mask[k] = 1.0
    return hed * mask.view(3, 1, 1)


def stain_channel(
    rgb: torch.Tensor,
    stain: str,
    rgb_from_hed: torch.Tensor | np.ndarray | None = None,
    hed_from_rgb: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """Channel image of one stain, ``T⁻¹(T(rgb) · P_k)``: a 3-channel RGB rendering (paper eq. 2).

    When only ``rgb_from_hed`` is given its inverse is used for ``hed_from_rgb``.
    """
    if rgb_from_hed is not None and hed_from_rgb is None:
        m = rgb_from_hed if isinstance(rgb_from_hed, torch.Tensor) else torch.from_numpy(np.asarray(rgb_from_hed))
        hed_from_rgb = torch.linalg.inv(m.to(torch.float64))
    hed = rgb_to_hed(rgb, hed_from_rgb)
    with no_autocast(hed):
        return _hed_to_rgb(project_hed(hed, stain), rgb_from_hed)


def stain_channels(
    rgb: torch.Tensor,
    stains: tuple[str, ...] = ("h", "e", "dab"),
    rgb_from_hed: torch.Tensor | np.ndarray | None = None,
    hed_from_rgb: torch.Tensor | np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """Several channel images from one deconvolution (cheaper than calling :func:`stain_channel` per stain)."""
    if rgb_from_hed is not None and hed_from_rgb is None:
        m = rgb_from_hed if isinstance(rgb_from_hed, torch.Tensor) else torch.from_numpy(np.asarray(rgb_from_hed))
        hed_from_rgb = torch.linalg.inv(m.to(torch.float64))
    hed = rgb_to_hed(rgb, hed_from_rgb)
    with no_autocast(hed):
        return {s: _hed_to_rgb(project_hed(hed, s), rgb_from_hed) for s in stains}


def od(rgb: torch.Tensor) -> torch.Tensor:
    """Optical density in scikit-image's normalisation, ``log(max(rgb, EPS)) / log(EPS)`` (0 = white)."""
    with no_autocast(rgb):
        return torch.log(rgb.to(compute_dtype(rgb)).clamp_min(EPS)) / LOG_ADJUST


def stain_od(rgb: torch.Tensor, stain: str, hed_from_rgb: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
    """One stain's concentration *before* ``T``'s clamp at 0, ``(od(rgb) @ hed_from_rgb)[k]``: ``[N, 1, H, W]``.

    Linear in the optical density, so a loss on it has a gradient everywhere, also where the
    stain is absent (negative values), unlike :func:`rgb_to_hed` whose ``max(·, 0)`` cuts it there.
    """
    if not rgb.is_floating_point():
        raise TypeError("stain_od expects a float tensor in [0, 1]; convert uint8 with x.float() / 255")
    _channels_last(rgb)
    with no_autocast(rgb):
        x = rgb.to(compute_dtype(rgb))
        m = _as_matrix(hed_from_rgb, HED_FROM_RGB, x)
        k = stain_index(stain)
        return _matmul(torch.log(x.clamp_min(EPS)) / LOG_ADJUST, m[:, k : k + 1])

"""StyleGAN2 modulated convolution with weight demodulation (paper §2.2; docs/method.md, “Networks”).

``ModConv(x, s) = Conv(x, W·(s+1) / sqrt(Σ(W·(s+1))² + eps)) + b``: the weights are scaled per sample
and per *input* channel by ``s + 1``, then renormalised ("demodulated") per sample and per *output*
channel. Written after stylegan3's ``modulated_conv2d``: a pure function with two equivalent paths.

- fused: one grouped convolution whose groups are the samples, each with its own weights.
- unfused: scale the input by ``s + 1``, run one shared convolution, scale the output by the
  demodulation coefficients. Same result (the modulation is linear in the input and the
  demodulation is a per-output-channel constant), different speed profile: no per-sample weights.
- ``fused="auto"``: :func:`prefer_fused` picks one by a fixed rule on the device and batch size
  (deterministic: the same input always takes the same path; docs/performance.md has the
  measurements behind the rule).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def demodulation_coefficients(weight: torch.Tensor, styles: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``1 / sqrt(Σ_{i,k,l} (W[o,i,k,l]·(s[n,i]+1))² + eps)``.

    Args:
        weight: ``[Cout, Cin, k, k]``.
        styles: ``[N, Cin]`` (the modulation is ``styles + 1``).
    Returns:
        ``[N, Cout]``.
    """
    # Σ_{i,k,l} (W[o,i,k,l]·m[n,i])² = Σ_i m[n,i]² · Σ_{k,l} W[o,i,k,l]²: the same sum without
    # building the [N, Cout, Cin, k, k] per-sample weights (N·Cout·Cin·k² elements, megabytes at
    # paper width) only to reduce them. A broadcast product, not a matmul, so that autocast never
    # turns it into bf16.
    w2 = weight.square().sum(dim=(2, 3))  # [Cout, Cin]
    m2 = (styles + 1.0).square()  # [N, Cin]
    return ((m2[:, None, :] * w2[None]).sum(dim=2) + eps).rsqrt()


#: How a modulated convolution is computed: grouped (``True``), unfused (``False``) or by :func:`prefer_fused`.
FusedMode = bool | Literal["auto"]

#: Batch sizes from which the unfused form is used on CUDA by :func:`prefer_fused` (see there).
CUDA_UNFUSED_MIN_BATCH = 2


def prefer_fused(x: torch.Tensor) -> bool:
    """The rule behind ``fused="auto"``: whether the grouped form is the faster one for input ``x``.

    - CPU: never. With channels_last (the fast path's layout) the unfused form was faster at
      every shape and batch size measured, batch 1 included; in NCHW the two tie for 64 channels
      and unfused wins for 512. The fused form also builds ``[N·Cout, Cin, k, k]`` weights per call.
    - CUDA (and other accelerators): fused for a single sample (one convolution, no extra
      scaling passes), unfused from ``CUDA_UNFUSED_MIN_BATCH`` samples on: StyleGAN2-ADA's choice
      for reduced precision, the fast path's default on CUDA (not yet measured here; see
      docs/performance.md).

    A fixed rule rather than a micro-benchmark, so that results never depend on timing noise.

    Args:
        x: the input ``[N, Cin, H, W]``.
    """
    if x.device.type == "cpu":
        return False
    return int(x.shape[0]) < CUDA_UNFUSED_MIN_BATCH


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    demodulate: bool = True,
    eps: float = 1e-8,
    padding: int = 0,
    padding_mode: str = "zeros",
    fused: FusedMode = True,
) -> torch.Tensor:
    """Modulated (and optionally demodulated) 2-d convolution, stride 1, no bias.

    Args:
        x: ``[N, Cin, H, W]``.
        weight: ``[Cout, Cin, k, k]`` shared weights ``W``.
        styles: ``[N, Cin]`` per-sample styles ``s``; weights are modulated by ``s + 1`` so that
            ``s = 0`` leaves ``W`` unchanged.
        demodulate: renormalise each sample's weights per output channel (StyleGAN2).
        eps: added under the square root of the demodulation.
        padding: spatial padding on each side.
        padding_mode: ``zeros`` | ``reflect`` | ``replicate`` | ``circular``.
        fused: one grouped convolution with per-sample weights (True), the unfused
            scale–conv–scale path (False), or ``"auto"`` (:func:`prefer_fused`); all give the
            same result up to rounding.
    Returns:
        ``[N, Cout, H + 2·padding − k + 1, W + 2·padding − k + 1]``.
    """
    if x.dim() != 4 or weight.dim() != 4 or styles.dim() != 2:
        raise ValueError(
            f"expected x [N,Cin,H,W], weight [Cout,Cin,k,k], styles [N,Cin]; "
            f"got {tuple(x.shape)}, {tuple(weight.shape)}, {tuple(styles.shape)}"
        )
    n, cin = x.shape[:2]
    cout = weight.shape[0]
    if weight.shape[1] != cin or styles.shape != (n, cin):
        raise ValueError(
            f"channel mismatch: x {tuple(x.shape)}, weight {tuple(weight.shape)}, styles {tuple(styles.shape)}"
        )
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
    if isinstance(fused, str):
        if fused != "auto":
            raise ValueError(f"fused must be True, False or 'auto', got {fused!r}")
        fused = prefer_fused(x)
    if padding and padding_mode != "zeros":
        x = F.pad(x, [padding] * 4, mode=padding_mode)
        padding = 0
    mod = (styles + 1.0).to(x.dtype)
    dcoefs = demodulation_coefficients(weight, styles, eps).to(x.dtype) if demodulate else None

    if not fused:
        y = F.conv2d(x * mod[:, :, None, None], weight.to(x.dtype), padding=padding)
        if dcoefs is not None:
            y = y * dcoefs[:, :, None, None]
        return y

    w = weight.to(x.dtype).unsqueeze(0) * mod[:, None, :, None, None]  # [N, Cout, Cin, k, k]
    if dcoefs is not None:
        w = w * dcoefs[:, :, None, None, None]
    # Samples become groups: input [1, N·Cin, H, W], weights [N·Cout, Cin, k, k].
    y = F.conv2d(x.reshape(1, n * cin, *x.shape[2:]), w.reshape(n * cout, cin, *w.shape[3:]), padding=padding, groups=n)
    return y.reshape(n, cout, *y.shape[2:])


class ModulatedConv2d(nn.Module):
    """Modulated convolution layer: affine map ``A: R^style_dim → R^Cin`` then :func:`modulated_conv2d`.

    ``A`` starts at zero weight and zero bias, so ``s = 0`` exactly at initialisation and the layer is
    a plain (demodulated) convolution until the styles learn something (docs/method.md, “Networks”).

    Args:
        in_channels, out_channels, kernel_size: as ``nn.Conv2d`` (stride 1, "same" padding, odd kernel).
        style_dim: size of the conditioning vector (4 HER2 level probabilities ``Ŝ``).
        demodulate: StyleGAN2 weight demodulation.
        bias: add a learnt per-output-channel bias after the convolution.
        padding_mode: ``reflect`` (default, as CycleGAN's ResNet blocks) or ``zeros`` etc.
        fused: grouped-convolution path (True), the unfused path (False) or ``"auto"``
            (:func:`prefer_fused`); a plain attribute, ``layer.fused``, that may be switched at any time.
        eps: demodulation epsilon.
    Shapes:
        ``forward(x [N, Cin, H, W], style [N, style_dim]) -> [N, Cout, H, W]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        style_dim: int = 4,
        demodulate: bool = True,
        bias: bool = True,
        padding_mode: str = "reflect",
        fused: FusedMode = True,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.demodulate = demodulate
        self.padding_mode = padding_mode
        if fused not in (True, False, "auto"):
            raise ValueError(f"fused must be True, False or 'auto', got {fused!r}")
        self.fused = fused
        self.eps = eps
        # nn.Conv2d's default initialisation: demodulation makes the forward pass scale-free, but
        # the weight scale still sets the *relative* step size of AdamW, so keep it as in the
        # plain convolutions around it instead of StyleGAN's N(0,1) + runtime scaling.
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, bias=bias)
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.affine = nn.Linear(style_dim, in_channels)
        nn.init.zeros_(self.affine.weight)
        nn.init.zeros_(self.affine.bias)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        s = self.affine(style)
        y = modulated_conv2d(
            x, self.weight, s, demodulate=self.demodulate, eps=self.eps,
            padding=self.kernel_size // 2, padding_mode=self.padding_mode, fused=self.fused,
        )
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)[None, :, None, None]
        return y

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"style_dim={self.affine.in_features}, demodulate={self.demodulate}, "
            f"padding_mode={self.padding_mode}, fused={self.fused}"
        )

"""BCIStainer's generator ("Just4Fun", BCI challenge), in this package's generator interface.

Architecture (quqixun/BCIStainer, ``BCIStainerBasic`` with ``style_type: mod``, their best entry
``stainer_basic_cmp/exp3``), widths for ``ngf = 32``, ``n_down = 3``:

    stem:     reflect-pad 3 → conv 7×7 (ngf) → norm → LeakyReLU 0.2
    encoder:  n_down × [reflect-pad 1 → conv 3×3 stride 2 (width ×2) → norm → LeakyReLU]     → F, 1/8
    style:    n_style_down × [the same at constant width] → global average pool               → s [N, 256]
    level:    dropout 0.2 → linear (n_levels)                                               → HER2 logits
    blocks:   n_blocks × modulated residual block on (F, s):
                  x + SimAM(lrelu(ModConv(lrelu(ModConv(x, A₁s)), A₂s))), divided by √2
              (StyleGAN2 modulated, demodulated 3×3 convolutions with reflect padding and no bias
              under batch norm; ``A₁``, ``A₂`` linear maps of s; no norm inside the block)
    low head: reflect-pad 1 → conv 3×3 (3) → tanh at 1/8 resolution                         → aux ihc_low
    decoder:  n_down × [transposed conv 3×3 stride 2 (width ÷2) → norm → LeakyReLU]
    head:     reflect-pad 3 → conv 7×7 (3) → tanh                                          → ihc

Unlike DeReStainer, the modulation is driven by the pooled feature vector ``s`` (256 numbers),
not by the level probabilities: the level head is a side branch trained by the focal loss, and
changing its output does not change the image.

Their parameters map onto :class:`~derestainer.core.config.ModelConfig` as ``init_channels → ngf``,
``encoder1_blocks → n_down``, ``style_blocks → n_fusion_blocks``, ``levels → n_levels``,
``norm_type → norm`` and ``demodulate`` (theirs: always on). Their second encoder has
``log2(full_size / 8) − encoder1_blocks`` stride-2 blocks, so that the map pooled into ``s`` is
8×8 px whatever the image size (4 blocks at their 1024 px, 3 at 512 px); that count is
``n_head_down`` here, the field of DeReStainer's heads. The rest has no field and takes exp3's
values as constructor defaults: dropout 0.2, SimAM attention on, the low-resolution head on,
linear style maps on (``style_linear``; the only variant written here, as ``style_type: mod``).

Initialisation is theirs (``init_type: normal``, gain 0.02): every convolution, transposed
convolution and linear layer N(0, 0.02) with zero biases, batch-norm scales N(1, 0.02). Their
initialiser also reaches the modulated convolutions' stored weights (it matches every class
whose name contains "Conv"), so those are N(0, 0.02) as well; demodulation makes their
equalised-learning-rate constant cancel, so the same stored weights give the same function.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from derestainer.layers.blocks import ConvNormAct, UpBlock, check_generator_norm
from derestainer.layers.modulated_conv import FusedMode, ModulatedConv2d
from derestainer.layers.simam import SimAM
from derestainer.models.base import GenOutput
from derestainer.models.baselines.pix2pix import init_weights
from derestainer.models.registry import register_generator

#: Their initialisation gain (``init_gain``), for every layer and the modulated weights.
INIT_GAIN = 0.02


class ModResBlock(nn.Module):
    """BCIStainer's ``ResnetModBlock``: two modulated 3×3 convolutions, each followed by LeakyReLU 0.2,
    then SimAM (optional), added to the input and scaled by ``1/√2``.

    Each convolution's :class:`ModulatedConv2d` affine map is their per-convolution ``nn.Linear``
    from the style vector to the input channels (``style_linear: true``).

    Shapes: ``forward(x [N, C, H, W], style [N, style_dim]) -> [N, C, H, W]`` (needs ``H, W ≥ 2``:
    reflect padding).
    """

    def __init__(self, channels: int, style_dim: int, bias: bool = False, demodulate: bool = True,
                 attention: bool = True, fused: FusedMode = "auto") -> None:
        super().__init__()
        self.conv1 = ModulatedConv2d(channels, channels, 3, style_dim=style_dim, demodulate=demodulate, bias=bias,
                                     padding_mode="reflect", fused=fused)
        self.conv2 = ModulatedConv2d(channels, channels, 3, style_dim=style_dim, demodulate=demodulate, bias=bias,
                                     padding_mode="reflect", fused=fused)
        self.act = nn.LeakyReLU(0.2)
        self.attention = SimAM() if attention else None

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        out = self.act(self.conv1(x, style))
        out = self.act(self.conv2(out, style))
        if self.attention is not None:
            out = self.attention(out)
        return (x + out) * (1.0 / math.sqrt(2.0))


class BCIStainerGenerator(nn.Module):
    """BCIStainer's ``BCIStainerBasic`` generator (modulated style blocks, HER2 head, low-resolution head).

    Args:
        in_channels, out_channels: 3 and 3 for RGB → RGB.
        ngf: stem width (their ``init_channels``; exp3: 32); the encoder ends at ``ngf·2**n_down``,
            which is also the style vector's size.
        n_down: stride-2 blocks of the encoder and transposed-conv blocks of the decoder
            (their ``encoder1_blocks``; exp3: 3).
        n_style_down: stride-2 blocks of the style encoder before its global pooling
            (their ``log2(full_size/8) − encoder1_blocks``: 4 at 1024 px, 3 at 512 px).
        n_blocks: modulated residual blocks (their ``style_blocks``; exp3: 9).
        n_levels: HER2 classes of the level head (4).
        norm: ``batch`` (theirs) | ``none``; instance norm is refused (seams on whole slides).
        dropout: dropout before the level head's linear layer (exp3: 0.2).
        attention: SimAM at the end of every modulated block (exp3: on).
        output_lowres: the 1/``2**n_down`` low-resolution output head (exp3: on).
        demodulate: StyleGAN2 weight demodulation (theirs: always on).
        fused_modconv: grouped, unfused or ``"auto"`` modulated convolutions (same results).

    ``forward(he, ihc=None)``: ``he`` ``[N, 3, H, W]`` in ``[-1, 1]`` with ``H, W`` multiples of
    :attr:`size_multiple` and at least :attr:`min_size` → :class:`GenOutput` with ``ihc``
    ``[N, 3, H, W]`` in ``[-1, 1]`` (tanh), ``level_logits`` ``[N, n_levels]`` and, with the
    low-resolution head, ``aux = {"ihc_low": [N, 3, H/2**n_down, W/2**n_down]}`` (tanh), in training
    and at inference alike. ``ihc`` is checked and otherwise ignored (the model has no IHC branch).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        ngf: int = 32,
        n_down: int = 3,
        n_style_down: int = 3,
        n_blocks: int = 9,
        n_levels: int = 4,
        norm: str = "batch",
        dropout: float = 0.2,
        attention: bool = True,
        output_lowres: bool = True,
        demodulate: bool = True,
        fused_modconv: FusedMode = "auto",
    ) -> None:
        super().__init__()
        check_generator_norm(norm)
        if ngf < 1 or n_down < 1 or n_style_down < 0 or n_blocks < 0 or n_levels < 2 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"invalid sizes ngf={ngf}, n_down={n_down}, n_style_down={n_style_down}, "
                             f"n_blocks={n_blocks}, n_levels={n_levels}, dropout={dropout}")
        self.n_down, self.n_style_down = n_down, n_style_down
        width = ngf * 2**n_down
        self.style_dim = width
        self.stem = ConvNormAct(in_channels, ngf, 7, padding_mode="reflect", norm=norm)
        self.encoder = nn.Sequential(*[
            ConvNormAct(ngf * 2**i, ngf * 2 ** (i + 1), 3, stride=2, padding_mode="reflect", norm=norm)
            for i in range(n_down)
        ])
        self.style_encoder = nn.Sequential(
            *[ConvNormAct(width, width, 3, stride=2, padding_mode="reflect", norm=norm) for _ in range(n_style_down)],
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
        )
        self.level_head = nn.Sequential(*([nn.Dropout(dropout)] if dropout > 0 else []), nn.Linear(width, n_levels))
        self.blocks = nn.ModuleList([
            ModResBlock(width, width, bias=norm != "batch", demodulate=demodulate, attention=attention,
                        fused=fused_modconv)
            for _ in range(n_blocks)
        ])
        self.low_head = (
            nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(width, out_channels, 3), nn.Tanh()) if output_lowres else None
        )
        self.decoder = nn.Sequential(*[
            UpBlock(ngf * 2 ** (i + 1), ngf * 2**i, norm=norm, mode="transpose") for i in reversed(range(n_down))
        ])
        self.head = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh())
        self._init_weights()

    def _init_weights(self) -> None:
        init_weights(self, INIT_GAIN)
        for m in self.modules():
            if isinstance(m, ModulatedConv2d):
                nn.init.normal_(m.weight, 0.0, INIT_GAIN)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this (``2**n_down``)."""
        return 2**self.n_down

    @property
    def min_size(self) -> int:
        """Smallest input height and width: every reflect-padded map must be at least 2 px, the style
        encoder's last input included (``size_multiple · (2**(n_style_down − 1) + 1)``, at least
        ``2 · size_multiple``)."""
        n = self.n_style_down
        return self.size_multiple * (2 ** (n - 1) + 1 if n > 1 else 2)

    def unused_parameters(self, active: frozenset[str], loss_cfg: Any) -> bool:
        """Whether some parameters get no gradient: the level head without L_level, the low-resolution
        head without its term."""
        return "level" not in active or (self.low_head is not None and "lowres" not in active)

    def set_fused_modconv(self, fused: FusedMode) -> None:
        """Switch the modulated blocks between grouped and unfused modulated convolutions (same results)."""
        for m in self.modules():
            if isinstance(m, ModulatedConv2d):
                m.fused = fused

    def _check(self, x: torch.Tensor, name: str) -> None:
        m, lo = self.size_multiple, self.min_size
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{name} must be [N, 3, H, W] in [-1, 1], got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % m or w % m or h < lo or w < lo:
            raise ValueError(
                f"{name} is {h}×{w} px; BCIStainer with n_down={self.n_down}, n_style_down={self.n_style_down} "
                f"needs height and width divisible by {m} and at least {lo} (pad or crop the input, e.g. to "
                f"{max(lo, -(-h // m) * m)}×{max(lo, -(-w // m) * m)})"
            )

    def encode(self, he: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F, s)``: the 1/``2**n_down`` feature map ``[N, C, h, w]`` and the style vector ``[N, C]``."""
        feat = self.encoder(self.stem(he))
        return feat, self.style_encoder(feat)

    def decode(self, feat: torch.Tensor, style: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(ihc, ihc_low)`` from the feature map and a style vector (``ihc_low`` None without the low head)."""
        x = feat
        for block in self.blocks:
            x = block(x, style)
        low = self.low_head(x) if self.low_head is not None else None
        return self.head(self.decoder(x)), low

    def forward(self, he: torch.Tensor, ihc: torch.Tensor | None = None) -> GenOutput:
        self._check(he, "he")
        if ihc is not None and ihc.shape != he.shape:
            raise ValueError(f"he {tuple(he.shape)} and ihc {tuple(ihc.shape)} must have the same shape")
        feat, style = self.encode(he)
        fake, low = self.decode(feat, style)
        aux = {"ihc_low": low} if low is not None else None
        return GenOutput(ihc=fake, level_logits=self.level_head(style), aux=aux)


@register_generator("bcistainer")
def build_bcistainer(model_cfg: Any) -> BCIStainerGenerator:
    """BCIStainer (quqixun/BCIStainer, exp3) from a :class:`~derestainer.core.config.ModelConfig`.

    Uses ``ngf``, ``n_down``, ``n_head_down`` (the style encoder's stride-2 blocks),
    ``n_fusion_blocks`` (the modulated blocks), ``n_levels``, ``norm`` and ``demodulate``; dropout,
    attention and the low-resolution head take exp3's values (0.2, on, on).
    """
    return BCIStainerGenerator(
        ngf=model_cfg.ngf,
        n_down=model_cfg.n_down,
        n_style_down=model_cfg.n_head_down,
        n_blocks=model_cfg.n_fusion_blocks,
        n_levels=model_cfg.n_levels,
        norm=model_cfg.norm,
        demodulate=model_cfg.demodulate,
    )

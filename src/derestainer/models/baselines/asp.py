"""ASP's generator (Li et al., "Adaptive supervised PatchNCE loss", MICCAI 2023), in this package's generator interface.

After the authors' code (lifangda01/AdaptiveSupervisedPatchNCE, built on CUT: ``models/networks.py``
``ResnetGenerator`` and ``PatchSampleF``, ``models/cpt_model.py``), trained there with
``--netG resnet_6blocks`` and the default anti-aliased sampling (``experiments/mist_launcher.py``):

    0  reflect-pad 3                                    ← NCE layer 0 (the padded input)
    1  conv 7×7 (ngf) → 2 norm → 3 ReLU
    n_down × [conv 3×3 (width ×2) → norm → ReLU → blur-pool ×½]    ← NCE layers 4 and 8 (the convs' outputs)
    n_blocks × residual block (pix2pix's, no dropout)              ← NCE layers 12 and 16 (blocks 1 and 5)
    n_down × [blur-upsample ×2 → conv 3×3 (width ÷2) → norm → ReLU]
    reflect-pad 3 → conv 7×7 (3) → tanh

Blur-pool (Zhang, ICML 2019): reflect-pad 1, depthwise 3×3 binomial ``[1, 2, 1]ᵀ[1, 2, 1]/16`` at
stride 2. Blur-upsample: replicate-pad 1, depthwise transposed convolution at stride 2 with the
4×4 binomial ``[1, 3, 3, 1]ᵀ[1, 3, 3, 1]/16``, cropped to exactly twice the size.

PatchNCE heads (their ``PatchSampleF`` with ``netF mlp_sample``, ``netF_nc 256``): for each NCE layer
``linear(C, 256) → ReLU → linear(256, 256)`` on features sampled at ``num_patches`` (256) random
positions, shared by every image of the batch, then L2-normalised. They are created here with the
generator (their widths are known), so they are saved with it and trained by its optimizer (theirs:
created at the first step, with a separate Adam of the same settings, which updates identically).

``forward(he)`` returns the image only. ``forward(he, ihc)`` (training, :data:`~derestainer.losses.terms.IHC_INPUT`)
also runs the encoder on the generated image (with gradients) and on the real IHC (without), and
returns in ``aux`` per NCE layer the projected features ``[N, num_patches, 256]`` read by the
``nce`` and ``asp`` terms (:mod:`derestainer.losses.patchnce`):

- ``nce_q`` / ``nce_k``: generated / input H&E at positions ``nce_ids`` drawn for this call;
- ``nce_sup_q`` / ``nce_sup_k``: generated / real IHC at other positions ``nce_sup_ids``.

Keys are detached, as their loss detaches them. Positions come from ``torch.randperm`` with
:attr:`ASPGenerator.patch_generator` (None: the global RNG, which the trainer seeds).

Norm: batch (or none) only. Theirs is instance norm (``normG instance``); this package refuses it in
generators because per-tile statistics make seams on whole slides. Their extra encoder passes (of
the generated and the real IHC images) would, with batch norm, mix IHC statistics into the running
ones used at inference; here those passes normalise by their own batch statistics and leave the
running statistics untouched (:func:`frozen_bn_stats`).

Initialisation is theirs (``init_type xavier``, ``init_gain 0.02``): convolutions and linear layers
Xavier-normal with gain 0.02 and zero biases, batch-norm scales N(1, 0.02).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from derestainer.core.errors import ConfigError
from derestainer.layers.blocks import check_generator_norm, frozen_bn_stats, make_norm
from derestainer.models.base import GenOutput
from derestainer.models.baselines.pix2pix import ResnetBlock
from derestainer.models.registry import register_generator

#: Their ``nce_layers``: indices into the generator's layer sequence (module docstring).
NCE_LAYERS = (0, 4, 8, 12, 16)
#: Their ``num_patches``: positions sampled per layer and image.
NUM_PATCHES = 256
#: Their ``netF_nc``: hidden and output width of each projection head.
MLP_WIDTH = 256
#: Their ``init_gain`` (Xavier-normal gain).
INIT_GAIN = 0.02


def _binomial(taps: Sequence[float], channels: int, scale: float = 1.0) -> torch.Tensor:
    a = torch.tensor(taps, dtype=torch.float32)
    k = torch.outer(a, a)
    return (k / k.sum() * scale).expand(channels, 1, len(taps), len(taps)).clone()


class BlurDownsample(nn.Module):
    """Anti-aliased ×½ down-sampling: reflect-pad 1, depthwise 3×3 binomial at stride 2.

    Shapes: ``[N, C, H, W] -> [N, C, ⌈H/2⌉, ⌈W/2⌉]``.
    """

    filt: torch.Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("filt", _binomial((1.0, 2.0, 1.0), channels), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, groups=x.shape[1])


class BlurUpsample(nn.Module):
    """Anti-aliased ×2 up-sampling: replicate-pad 1, depthwise stride-2 transposed conv with the 4×4
    binomial (×4, so that a constant stays constant), cropped by one pixel on every side.

    Shapes: ``[N, C, H, W] -> [N, C, 2H, 2W]``.
    """

    filt: torch.Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("filt", _binomial((1.0, 3.0, 3.0, 1.0), channels, scale=4.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv_transpose2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.filt, stride=2, padding=2,
                               groups=x.shape[1])
        return y[..., 1:-1, 1:-1]


class ASPGenerator(nn.Module):
    """CUT's ResNet generator with anti-aliased sampling and PatchNCE projection heads (module docstring).

    Args:
        in_channels, out_channels: 3 and 3 for RGB → RGB.
        ngf: width of the first layer; the residual blocks run at ``ngf · 2**n_down`` (theirs: 64).
        n_down: down-sampling (and up-sampling) stages (theirs: 2).
        n_blocks: residual blocks (theirs: 6, ``resnet_6blocks``).
        norm: ``batch`` | ``none``.
        nce_layers: indices into :attr:`net` whose outputs feed PatchNCE, all in the encoder.
        num_patches: positions sampled per layer (fewer when a map has fewer).
        mlp_width: width of the projection heads.

    ``forward(he, ihc=None)``: ``he`` ``[N, 3, H, W]`` in ``[-1, 1]``, ``H, W`` divisible by
    ``2**n_down`` → :class:`GenOutput` (``ihc`` ``[N, 3, H, W]``; ``aux`` only when ``ihc`` is given).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, ngf: int = 64, n_down: int = 2,
                 n_blocks: int = 6, norm: str = "batch", nce_layers: Sequence[int] = NCE_LAYERS,
                 num_patches: int = NUM_PATCHES, mlp_width: int = MLP_WIDTH) -> None:
        super().__init__()
        check_generator_norm(norm)
        if ngf < 1 or n_down < 0 or n_blocks < 0 or num_patches < 1 or mlp_width < 1:
            raise ValueError(f"invalid sizes ngf={ngf}, n_down={n_down}, n_blocks={n_blocks}, "
                             f"num_patches={num_patches}, mlp_width={mlp_width}")
        bias = norm != "batch"
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7, bias=bias),
                                   make_norm(norm, ngf), nn.ReLU()]
        widths, ch = [in_channels, ngf, ngf, ngf], ngf
        for _ in range(n_down):
            layers += [nn.Conv2d(ch, ch * 2, 3, padding=1, bias=bias), make_norm(norm, ch * 2), nn.ReLU(),
                       BlurDownsample(ch * 2)]
            ch *= 2
            widths += [ch] * 4
        layers += [ResnetBlock(ch, norm=norm) for _ in range(n_blocks)]
        widths += [ch] * n_blocks
        self.n_encoder = len(layers)
        for _ in range(n_down):
            layers += [BlurUpsample(ch), nn.Conv2d(ch, ch // 2, 3, padding=1, bias=bias), make_norm(norm, ch // 2),
                       nn.ReLU()]
            ch //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, out_channels, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.nce_layers = tuple(int(i) for i in nce_layers)
        if not self.nce_layers or list(self.nce_layers) != sorted(set(self.nce_layers)) \
                or self.nce_layers[0] < 0 or self.nce_layers[-1] >= self.n_encoder:
            raise ValueError(f"nce_layers must be increasing indices of encoder layers 0…{self.n_encoder - 1} "
                             f"(n_down={n_down}, n_blocks={n_blocks}), got {list(self.nce_layers)}")
        self.heads = nn.ModuleList([
            nn.Sequential(nn.Linear(widths[i], mlp_width), nn.ReLU(), nn.Linear(mlp_width, mlp_width))
            for i in self.nce_layers
        ])
        self.n_down, self.num_patches = n_down, num_patches
        #: RNG of the patch positions; None draws from the global one (seeded by the trainer).
        self.patch_generator: torch.Generator | None = None
        xavier_init(self)

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this (``2**n_down``)."""
        return 2**self.n_down

    def _check(self, x: torch.Tensor, name: str) -> None:
        m = self.size_multiple
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"{name} must be [N, 3, H, W] with H, W divisible by {m} (2**n_down), got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of the NCE layers, ``[N, C_l, H_l, W_l]`` each (the rest of the network is not run)."""
        feats = []
        for i, layer in enumerate(self.net[: self.nce_layers[-1] + 1]):
            x = layer(x)
            if i in self.nce_layers:
                feats.append(x)
        return feats

    def _translate(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = []
        for i, layer in enumerate(self.net):
            x = layer(x)
            if i in self.nce_layers:
                feats.append(x)
        return x, feats

    def sample_ids(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per layer, ``min(num_patches, H_l·W_l)`` distinct flat positions in random order (one set for the batch)."""
        ids = []
        for f in feats:
            hw = f.shape[-2] * f.shape[-1]
            g = self.patch_generator
            perm = torch.randperm(hw, generator=g, device=g.device if g is not None else f.device)
            ids.append(perm[: min(self.num_patches, hw)].to(f.device))
        return ids

    def project(self, feats: Sequence[torch.Tensor], ids: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Features at positions ``ids`` through each layer's head, L2-normalised: ``[N, n_l, mlp_width]`` (float32)."""
        if len(feats) != len(self.heads) or len(ids) != len(self.heads):
            raise ValueError(f"project: {len(feats)} feature maps and {len(ids)} id sets for {len(self.heads)} heads")
        out = []
        for head, f, idx in zip(self.heads, feats, ids):
            x = f.flatten(2)[:, :, idx].transpose(1, 2)
            out.append(F.normalize(head(x).float(), dim=-1, eps=1e-7))
        return out

    def unused_parameters(self, active: frozenset[str], loss_cfg: Any) -> bool:
        """Whether some parameters get no gradient: the PatchNCE heads without an NCE term."""
        return not {"nce", "asp"} & active

    def forward(self, he: torch.Tensor, ihc: torch.Tensor | None = None) -> GenOutput:
        self._check(he, "he")
        if ihc is None:
            return GenOutput(ihc=self.net(he))
        self._check(ihc, "ihc")
        fake, feats_he = self._translate(he)
        with frozen_bn_stats(self.net):
            feats_fake = self.encode(fake)
            with torch.no_grad():
                feats_ihc = self.encode(ihc)
        ids, sup_ids = self.sample_ids(feats_he), self.sample_ids(feats_ihc)
        with torch.no_grad():
            keys = self.project([f.detach() for f in feats_he], ids)
            sup_keys = self.project(feats_ihc, sup_ids)
        aux: dict[str, Any] = {
            "nce_q": self.project(feats_fake, ids), "nce_k": keys, "nce_ids": ids,
            "nce_sup_q": self.project(feats_fake, sup_ids), "nce_sup_k": sup_keys, "nce_sup_ids": sup_ids,
        }
        return GenOutput(ihc=fake, aux=aux)


def xavier_init(module: nn.Module, gain: float = INIT_GAIN) -> None:
    """CUT's ``init_type='xavier'``: conv / linear weights Xavier-normal (``gain``), biases 0; batch-norm scales N(1, gain)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)


@register_generator("asp")
def build_asp(model_cfg: Any) -> ASPGenerator:
    """ASP from a :class:`~derestainer.core.config.ModelConfig`: ``ngf``, ``n_down``, ``norm`` and
    ``n_fusion_blocks`` (the residual blocks); the NCE layers, patches and head width take their values.

    Raises:
        ConfigError: an instance-norm generator, or too few blocks for their NCE layers (block 5 is one).
    """
    try:
        return ASPGenerator(ngf=model_cfg.ngf, n_down=model_cfg.n_down, n_blocks=model_cfg.n_fusion_blocks,
                            norm=model_cfg.norm)
    except ValueError as exc:
        raise ConfigError(f"model (asp): {exc}") from None

"""DeReStainer (paper Fig. 2): DeStainer → (f_level → Ŝ) → feature fusion → ReStainer, plus f_H for L_H."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from derestainer.layers.blocks import check_generator_norm, frozen_bn_stats
from derestainer.layers.modulated_conv import FusedMode
from derestainer.models.base import GenOutput
from derestainer.models.destainer import DeStainer, HEmbedHead, HPredictor, LevelHead, load_stain_matrix
from derestainer.models.fusion import FeatureFusion
from derestainer.models.registry import register_generator
from derestainer.models.restainer import ReStainer


class DeReStainer(nn.Module):
    """The DeReStainer generator.

    Args:
        ngf: encoder stem width; encoder widths ``ngf·2^i``, i = 0..n_down.
        n_down: down-sampling blocks of the encoder and up-sampling blocks of the decoder (paper: 3).
        n_head_down: down-sampling blocks in f_H and f_level (paper: 2).
        n_fusion_blocks: modulated residual blocks (paper: 9).
        n_levels: HER2 classes (4: 0, 1+, 2+, 3+); also the style dimension of the modulated convs.
        encoder_input: ``h`` (paper) | ``rgb`` | ``h+rgb``.
        norm: ``batch`` | ``none``. Instance norm is refused: per-tile statistics make seams on whole slides.
        h_embed_dim: size of the f_H embedding; 0 = the encoder's output width.
        h_predictor: hidden width of a SimSiam predictor on f_H (``loss.h_mode: simsiam``); 0 = none.
        stop_ihc_grad: compute the IHC branch of L_H without gradients (paper: gradients flow).
        demodulate: StyleGAN2 weight demodulation in the fusion blocks.
        rgb_from_hed: 3×3 stain matrix (default Ruifrok), stored as a buffer with the weights.
        fused_modconv: grouped (True), unfused (False) or "auto" (the faster form for the input at hand, layers.modulated_conv.prefer_fused); see :meth:`set_fused_modconv`.

    ``forward(he, ihc=None) -> GenOutput``: ``he``/``ihc`` ``[N, 3, H, W]`` in ``[-1, 1]``, ``H`` and ``W``
    divisible by ``2^n_down`` and at least ``2^(n_down+1)``.
    """

    def __init__(
        self,
        *,
        ngf: int = 64,
        n_down: int = 3,
        n_head_down: int = 2,
        n_fusion_blocks: int = 9,
        n_levels: int = 4,
        encoder_input: str = "h",
        norm: str = "batch",
        h_embed_dim: int = 0,
        h_predictor: int = 0,
        stop_ihc_grad: bool = False,
        demodulate: bool = True,
        rgb_from_hed: np.ndarray | torch.Tensor | None = None,
        fused_modconv: FusedMode = "auto",
    ) -> None:
        super().__init__()
        check_generator_norm(norm)
        if n_down < 1 or ngf < 1 or n_levels < 2 or n_head_down < 0 or n_fusion_blocks < 0:
            raise ValueError("need ngf ≥ 1, n_down ≥ 1, n_levels ≥ 2, n_head_down ≥ 0, n_fusion_blocks ≥ 0")
        self.n_down = n_down
        self.stop_ihc_grad = stop_ihc_grad
        self.destainer = DeStainer(ngf, n_down, encoder_input=encoder_input, norm=norm, rgb_from_hed=rgb_from_hed)
        c = self.destainer.out_channels
        self.f_h = HEmbedHead(c, n_head_down, embed_dim=h_embed_dim, norm=norm)
        self.f_level = LevelHead(c, n_head_down, n_levels=n_levels, norm=norm)
        self.h_predictor = HPredictor(self.f_h.out_features, h_predictor) if h_predictor > 0 else None
        self.fusion = FeatureFusion(c, n_fusion_blocks, style_dim=n_levels, demodulate=demodulate, fused=fused_modconv)
        self.restainer = ReStainer(ngf, n_down, norm=norm)

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2**self.n_down

    def unused_parameters(self, active: frozenset[str], loss_cfg: Any) -> bool:
        """Whether some parameters get no gradient with these active terms (DDP must then look for them):
        f_H without L_H, its projection under the InfoNCE variant (which reads the maps before it), the
        SimSiam predictor unless L_H is SimSiam."""
        if "h" not in active:
            return True
        if loss_cfg.h_mode == "infonce" and isinstance(self.f_h.proj, nn.Linear):
            return True
        return self.h_predictor is not None and loss_cfg.h_mode != "simsiam"

    def set_fused_modconv(self, fused: FusedMode) -> None:
        """Switch the fusion blocks between grouped and unfused modulated convolutions (same results)."""
        self.fusion.set_fused(fused)

    def stain_image(self, x: torch.Tensor, stain: str = "h") -> torch.Tensor:
        """Channel image of ``stain`` (h | e | dab) with this model's stain matrix, model space in and out."""
        return self.destainer.separation(x, stain)

    def _check(self, x: torch.Tensor, name: str) -> None:
        m = self.size_multiple
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{name} must be [N, 3, H, W] in [-1, 1], got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % m or w % m or h < 2 * m or w < 2 * m:
            raise ValueError(
                f"{name} is {h}×{w} px; DeReStainer with n_down={self.n_down} needs height and width "
                f"divisible by {m} and at least {2 * m} (pad or crop the input, e.g. to "
                f"{max(2 * m, h // m * m)}×{max(2 * m, w // m * m)})"
            )

    def forward(self, he: torch.Tensor, ihc: torch.Tensor | None = None) -> GenOutput:
        self._check(he, "he")
        if ihc is not None:
            self._check(ihc, "ihc")
            if ihc.shape != he.shape:
                raise ValueError(f"he {tuple(he.shape)} and ihc {tuple(ihc.shape)} must have the same shape")
        feat = self.destainer(he)
        level_logits = self.f_level(feat)
        styles = torch.softmax(level_logits.float(), dim=1).to(feat.dtype)  # Ŝ
        fake = self.restainer(self.fusion(feat, styles))
        if ihc is None:
            return GenOutput(ihc=fake, level_logits=level_logits, h_embed_he=self.f_h(feat))
        h_he, map_he = self.f_h.forward_with_map(feat)
        grad = contextlib.nullcontext() if not self.stop_ihc_grad else torch.no_grad()
        with grad, frozen_bn_stats(self.destainer, self.f_h):
            h_ihc, map_ihc = self.f_h.forward_with_map(self.destainer(ihc))
        aux: dict[str, torch.Tensor] = {"h_map_he": map_he, "h_map_ihc": map_ihc}
        if self.h_predictor is not None:
            aux["h_pred_he"], aux["h_pred_ihc"] = self.h_predictor(h_he), self.h_predictor(h_ihc)
        return GenOutput(ihc=fake, level_logits=level_logits, h_embed_he=h_he, h_embed_ihc=h_ihc, aux=aux)


def generator_kwargs(model_cfg: Any) -> dict[str, Any]:
    """Constructor kwargs of :class:`DeReStainer` from a :class:`~derestainer.core.config.ModelConfig`."""
    return dict(
        ngf=model_cfg.ngf,
        n_down=model_cfg.n_down,
        n_head_down=model_cfg.n_head_down,
        n_fusion_blocks=model_cfg.n_fusion_blocks,
        n_levels=model_cfg.n_levels,
        encoder_input=model_cfg.encoder_input,
        norm=model_cfg.norm,
        h_embed_dim=model_cfg.h_embed_dim,
        h_predictor=model_cfg.h_predictor,
        stop_ihc_grad=model_cfg.stop_ihc_grad,
        demodulate=model_cfg.demodulate,
        rgb_from_hed=load_stain_matrix(model_cfg.stain_matrix),
    )


@register_generator("derestainer")
def build_generator(model_cfg: Any) -> DeReStainer:
    """Build :class:`DeReStainer` from ``model_cfg`` (``stain_matrix``: 'ruifrok' or a .json/.npy path)."""
    return DeReStainer(**generator_kwargs(model_cfg))

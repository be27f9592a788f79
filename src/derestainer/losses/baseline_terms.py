"""The baselines' generator terms: PyramidPix2Pix's pyramid L1, pix2pix's L1, and pix2pixHD's
discriminator feature matching and VGG perceptual loss.

pix2pixHD's VGG loss (Wang et al. 2018) needs ImageNet-trained VGG-19 weights, which this package
cannot download: it runs only when ``loss.vgg_weights`` names a local file
(:func:`derestainer.models.vgg.load_vgg19`), and the trainer says so in the run log and summary
when the term is asked for and no file is given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from derestainer.losses.adversarial import feature_matching_loss
from derestainer.losses.elementary import fp32, mae_loss
from derestainer.losses.pyramid import pyramid_l1_loss
from derestainer.losses.terms import D_FEATURES, VGG, LossInputs, register_term

#: pix2pixHD's weights of the five VGG-19 slices (relu1_1 … relu5_1).
VGG_LAYER_WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)


@fp32
def vgg_loss(fake_feats: Sequence[torch.Tensor], real_feats: Sequence[torch.Tensor],
             weights: Sequence[float] = VGG_LAYER_WEIGHTS) -> torch.Tensor:
    """pix2pixHD's perceptual loss without its ``lambda_feat``: ``Σ_i w_i · mean |φ_i(ŷ) − φ_i(y)|``."""
    if len(fake_feats) != len(real_feats) or len(fake_feats) != len(weights):
        raise ValueError(f"vgg_loss: {len(fake_feats)} fake, {len(real_feats)} real maps and {len(weights)} weights")
    return torch.stack([w * (f - r.detach()).abs().mean() for w, f, r in zip(weights, fake_feats, real_feats)]).sum()


@register_term("pyramid", weight=("pyramid",))
def _pyramid(x: LossInputs) -> torch.Tensor:
    return pyramid_l1_loss(x.out.ihc, x.ihc, x.cfg.pyramid_levels)


@register_term("l1", weight=("l1",))
def _l1(x: LossInputs) -> torch.Tensor:
    return mae_loss(x.out.ihc, x.ihc)


@register_term("lowres", weight=("content", "lowres"))
def _lowres(x: LossInputs) -> torch.Tensor | None:
    """BCIStainer's low-resolution head: MAE against the real IHC resized (bilinear, corners aligned) to its size."""
    low = x.aux("ihc_low")
    if low is None:
        return None
    target = F.interpolate(x.ihc.float(), size=tuple(low.shape[-2:]), mode="bilinear", align_corners=True)
    return mae_loss(low, target)


@register_term("fm", weight=("fm",), needs={D_FEATURES})
def _fm(x: LossInputs) -> torch.Tensor | None:
    if x.d_fake_feats is None or x.d_real_feats is None:
        return None
    return feature_matching_loss(x.d_fake_feats, x.d_real_feats)


@register_term("vgg", weight=("vgg",), needs={VGG})
def _vgg(x: LossInputs) -> torch.Tensor | None:
    if x.vgg_fake is None or x.vgg_real is None:
        return None
    return vgg_loss(x.vgg_fake, x.vgg_real)

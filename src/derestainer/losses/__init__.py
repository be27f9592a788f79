"""Losses of DeReStainer (paper §2.4) and of the baselines, and the generator objective built from them.

- :mod:`.elementary`: cosine, MAE, L_DAB, SSIM, focal loss (fp32 under autocast);
- :mod:`.adversarial`: LSGAN / original GAN (optional label smoothing), pix2pixHD's feature matching;
- :mod:`.pyramid`: PyramidPix2Pix's Gaussian-pyramid L1;
- :mod:`.terms`: the registry of generator terms (name, weight fields, needs);
- :mod:`.stain_terms`: L_H (``loss.h_mode``) and L_DAB (``loss.dab_mode``) with their variants;
- :mod:`.objective`: the content, level and GAN terms and :func:`generator_losses`;
- :mod:`.baseline_terms`: the baselines' pyramid, L1, feature-matching and VGG terms;
- :mod:`.patchnce`: ASP's PatchNCE and adaptive supervised PatchNCE terms.

Importing this package registers every built-in term.
"""

# registration side effects, in the order the terms are summed (L_H and L_DAB first, as the paper writes L)
from derestainer.losses import stain_terms  # noqa: I001, F401
from derestainer.losses import objective  # noqa: F401
from derestainer.losses import baseline_terms, patchnce  # noqa: F401
from derestainer.losses.adversarial import (
    GAN_LOSSES,
    feature_matching_loss,
    gan_d_loss,
    gan_g_loss,
    gan_losses,
    lsgan_d_loss,
    lsgan_g_loss,
    vanilla_d_loss,
    vanilla_g_loss,
)
from derestainer.losses.baseline_terms import vgg_loss
from derestainer.losses.elementary import (
    cosine_loss,
    dab_l1_loss,
    focal_loss,
    fp32,
    gaussian_kernel1d,
    mae_loss,
    sep_filter,
    ssim,
    ssim_loss,
)
from derestainer.losses.objective import GeneratorLoss, generator_losses, sum_terms
from derestainer.losses.pyramid import gaussian_pyramid, pyramid_l1_loss
from derestainer.losses.stain_terms import dab_od_loss, embedding_spread, simsiam_loss, spatial_infonce_loss
from derestainer.losses.terms import TERMS, LossInputs, active_terms, needs_of, register_term, term_weights

__all__ = [
    "GAN_LOSSES", "TERMS", "GeneratorLoss", "LossInputs", "active_terms", "cosine_loss", "dab_l1_loss",
    "dab_od_loss", "embedding_spread", "feature_matching_loss", "focal_loss", "fp32", "gan_d_loss", "gan_g_loss",
    "gan_losses", "gaussian_kernel1d", "gaussian_pyramid", "generator_losses", "lsgan_d_loss", "lsgan_g_loss",
    "mae_loss", "needs_of", "pyramid_l1_loss", "register_term", "sep_filter", "simsiam_loss",
    "spatial_infonce_loss", "ssim", "ssim_loss", "sum_terms", "term_weights", "vanilla_d_loss",
    "vanilla_g_loss", "vgg_loss",
]

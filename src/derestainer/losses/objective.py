"""The generator objective: the weighted sum of every active registered term (:mod:`.terms`).

DeReStainer's (paper §2.4, weights §3.1)::

    L = stain·(h·L_H + dab·L_DAB) + content·(ssim·L_ssim + mae·L_mae + cmp·L_cmp)
        + level·L_level + gan·L_GAN

and the baselines' terms in the same sum (``pyramid``, ``l1``, ``fm``, ``vgg``, PatchNCE, …), each
registered by the module that defines it. This module registers the content, level and GAN terms;
:mod:`.stain_terms` L_H and L_DAB; :mod:`.baseline_terms` the baselines'.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from derestainer.losses.adversarial import gan_g_loss
from derestainer.losses.elementary import cosine_loss, focal_loss, mae_loss, ssim_loss
from derestainer.losses.terms import COMPARATOR, DISCRIMINATOR, TERMS, LossInputs, active_terms, register_term, term_weights

if TYPE_CHECKING:
    from derestainer.models.base import GenOutput


@register_term("ssim", weight=("content", "ssim"))
def _ssim(x: LossInputs) -> torch.Tensor:
    return ssim_loss(x.out.ihc, x.ihc, win_size=x.cfg.ssim_win, sigma=x.cfg.ssim_sigma)


@register_term("mae", weight=("content", "mae"))
def _mae(x: LossInputs) -> torch.Tensor:
    return mae_loss(x.out.ihc, x.ihc)


@register_term("cmp", weight=("content", "cmp"), needs={COMPARATOR})
def _cmp(x: LossInputs) -> torch.Tensor | None:
    if x.cmp_fake is None or x.cmp_real is None or x.progress < x.cfg.cmp_start:
        return None
    return cosine_loss(x.cmp_fake, x.cmp_real)


@register_term("level", weight=("level",))
def _level(x: LossInputs) -> torch.Tensor | None:
    if x.out.level_logits is None or x.level is None:
        return None
    alpha = tuple(float(a) for a in x.cfg.focal_alpha) or None
    return focal_loss(x.out.level_logits, x.level, gamma=x.cfg.focal_gamma, alpha=alpha)


@register_term("gan", weight=("gan",), needs={DISCRIMINATOR})
def _gan(x: LossInputs) -> torch.Tensor | None:
    if x.d_fake is None:
        return None
    return gan_g_loss(x.cfg.gan_mode, x.d_fake, smooth=x.cfg.gan_smooth)


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
    **extra: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The generator's total loss and its terms.

    Args:
        out: the generator's output (``out.ihc`` in model space).
        he: ``[N, 3, H, W]`` input H&E.
        ihc: ``[N, 3, H, W]`` real IHC, model space.
        level: ``[N]`` HER2 level, −1 unknown (ignored); ``None`` skips L_level.
        d_fake_outputs: discriminator outputs on (he, generated) per scale; ``None`` skips L_GAN.
        cmp_feats_fake, cmp_feats_real: comparator features of generated/real IHC; ``None`` skips L_cmp.
        cfg: a :class:`~derestainer.core.config.LossConfig`.
        rgb_from_hed: stain matrix for L_DAB (pass the generator's, e.g. ``G.destainer.separation.rgb_from_hed``).
        extra: further :class:`~derestainer.losses.terms.LossInputs` fields (``progress``,
            ``d_fake_feats``, ``d_real_feats``, ``vgg_fake``, ``vgg_real``).
    Returns:
        ``(total, terms)``: ``total`` a scalar with graph; ``terms`` maps each *computed* term to its
        **unweighted** value, detached, plus ``'total'`` and the diagnostics of
        :func:`diagnostics`. A term whose weight is 0 or whose inputs are missing is neither
        computed nor listed.
    """
    x = LossInputs(out=out, he=he, ihc=ihc, level=level, cfg=cfg, rgb_from_hed=rgb_from_hed,
                   d_fake=d_fake_outputs, cmp_fake=cmp_feats_fake, cmp_real=cmp_feats_real, **extra)
    return sum_terms(x)


def sum_terms(x: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(total, terms)`` of :func:`generator_losses` for prepared inputs."""
    w = term_weights(x.cfg)
    total = x.out.ihc.new_zeros((), dtype=torch.float32)
    terms: dict[str, torch.Tensor] = {}
    for name, term in TERMS.items():
        if w[name] == 0.0:
            continue
        value = term.fn(x)
        if value is None:
            continue
        total = total + w[name] * value
        terms[name] = value.detach()
    terms.update(diagnostics(x, terms))
    terms["total"] = total.detach()
    return total, terms


def diagnostics(x: LossInputs, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Values logged beside the terms, not optimised: ``h_spread``, the collapse indicator of f_H
    (:func:`~derestainer.losses.stain_terms.embedding_spread` of the H&E embeddings), when L_H was computed."""
    from derestainer.losses.stain_terms import embedding_spread

    if "h" in terms and x.out.h_embed_he is not None:
        return {"h_spread": embedding_spread(x.out.h_embed_he)}
    return {}


class GeneratorLoss:
    """:func:`generator_losses` bound to a :class:`~derestainer.core.config.LossConfig` (and a stain matrix).

    ``loss(out, he, ihc, level=None, d_fake_outputs=None, cmp_feats_fake=None, cmp_feats_real=None, **extra)
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
        **extra: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return generator_losses(out, he, ihc, level, d_fake_outputs, cmp_feats_fake, cmp_feats_real, self.cfg,
                                self.rgb_from_hed, **extra)

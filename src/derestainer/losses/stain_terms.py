"""L_H and L_DAB (paper §2.3) and their variants (``loss.h_mode``, ``loss.dab_mode``).

L_H asks f_H to embed the H&E's and the IHC's hematoxylin alike. The paper's form, ``1 − cos``
with no negatives, has a trivial minimum: f_H maps everything to one vector, after which L_H is 0
and carries no signal (measured on SynthBCI: it falls to ≈ 0 within ten steps; docs/benchmarks.md).
Two variants cannot collapse that way:

- ``simsiam`` (Chen & He 2021): a predictor MLP ``p`` on top of f_H and a stop-gradient on the
  other branch, ``½ [D(p(z_he), sg(z_ihc)) + D(p(z_ihc), sg(z_he))]`` with ``D = 1 − cos``;
- ``infonce`` (van den Oord et al. 2018): on f_H's feature *maps* before pooling, each H&E location
  is a query whose positive is the same location of the IHC map (the sections are adjacent, so the
  hematoxylin lies pixel for pixel at the same place up to the section offset) and whose negatives
  are every other location of the batch's IHC maps (spatial and in-batch), at temperature ``h_tau``.

L_DAB compares DAB channel images, in which a pixel without DAB is white whatever the model
does: the ``max(·, 0)`` of the colour deconvolution gives no gradient there, so the term can remove
DAB but not add it. ``dab_mode: od`` compares the DAB concentrations before that clamp (linear in
the optical density: a gradient everywhere).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from derestainer.core.config import DAB_MODES, H_MODES
from derestainer.core.errors import ConfigError
from derestainer.core.ranges import signed_to_unit
from derestainer.losses.elementary import cosine_loss, dab_l1_loss, fp32
from derestainer.losses.terms import IHC_INPUT, LossInputs, register_term
from derestainer.stain.functional import stain_od


@fp32
def simsiam_loss(p_a: torch.Tensor, z_a: torch.Tensor, p_b: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """Symmetric SimSiam loss ``½ [(1 − cos(p_a, sg z_b)) + (1 − cos(p_b, sg z_a))]``, mean over the batch.

    ``p_*``: predictor outputs ``[N, D]``; ``z_*``: the projections they predict, ``[N, D]`` (detached here).
    """
    return 0.5 * (cosine_loss(p_a, z_b.detach()) + cosine_loss(p_b, z_a.detach()))


@fp32
def spatial_infonce_loss(q: torch.Tensor, k: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """InfoNCE between two feature maps, location ``(n, y, x)`` of ``q`` matched with the same one of ``k``.

    Every location of ``q`` (``[N, C, h, w]``) is a query; its logits are its cosine similarities
    with all ``N·h·w`` locations of ``k`` divided by ``tau``; the target is its own location.
    With ``N·h·w = 1`` there is no negative and the loss is 0.

    Returns:
        scalar: the mean cross entropy over queries.
    """
    if q.shape != k.shape or q.dim() != 4:
        raise ValueError(f"spatial_infonce_loss expects two [N, C, h, w] maps of one shape, got {tuple(q.shape)}, {tuple(k.shape)}")
    if tau <= 0:
        raise ValueError(f"the InfoNCE temperature must be > 0, got {tau}")
    c = q.shape[1]
    qf = F.normalize(q.permute(0, 2, 3, 1).reshape(-1, c), dim=1)
    kf = F.normalize(k.permute(0, 2, 3, 1).reshape(-1, c), dim=1)
    logits = qf @ kf.t() / tau
    return F.cross_entropy(logits, torch.arange(qf.shape[0], device=q.device))


@torch.no_grad()
def embedding_spread(z: torch.Tensor) -> torch.Tensor:
    """Collapse indicator: the std across the batch of the L2-normalised embeddings, mean over dimensions.

    0 when every sample gets the same direction (collapse); about ``1/√D`` for directions spread
    uniformly over the sphere. ``z``: ``[N, D]`` (``[N, C, h, w]`` maps are pooled first).
    """
    z = z.float()
    if z.dim() > 2:
        z = z.mean(dim=tuple(range(2, z.dim())))
    if z.shape[0] < 2:
        return z.new_zeros(())
    return F.normalize(z, dim=1).std(dim=0).mean()


@fp32
def dab_od_loss(fake: torch.Tensor, real: torch.Tensor, rgb_from_hed: torch.Tensor | None = None) -> torch.Tensor:
    """``mean |c_DAB(ŷ) − c_DAB(y)|`` on the DAB concentrations before the clamp (``dab_mode: od``).

    In scikit-image's normalised optical density (a pure-DAB pixel of the Ruifrok vector at full
    saturation is about 1; the tissue of BCI sits around 0.02–0.2). ``fake``, ``real``: ``[N, 3, H, W]``
    in model space.
    """
    inv = torch.linalg.inv(rgb_from_hed.float()) if rgb_from_hed is not None else None
    c_fake = stain_od(signed_to_unit(fake), "dab", inv)
    with torch.no_grad():
        c_real = stain_od(signed_to_unit(real), "dab", inv)
    return (c_fake - c_real).abs().mean()


def _check_mode(value: str, modes: tuple[str, ...], key: str) -> str:
    if value not in modes:
        raise ValueError(f"unknown {key} {value!r}; choose one of {', '.join(modes)}")
    return value


@register_term("h", weight=("stain", "h"), needs={IHC_INPUT})
def _h_term(x: LossInputs) -> torch.Tensor | None:
    mode = _check_mode(x.cfg.h_mode, H_MODES, "loss.h_mode")
    out = x.out
    if mode == "cosine":
        if out.h_embed_he is None or out.h_embed_ihc is None:
            return None
        return cosine_loss(out.h_embed_he, out.h_embed_ihc)
    if mode == "simsiam":
        p_he, p_ihc = x.aux("h_pred_he"), x.aux("h_pred_ihc")
        if p_he is None or p_ihc is None or out.h_embed_he is None or out.h_embed_ihc is None:
            raise ConfigError("loss.h_mode=simsiam needs the generator's f_H predictor: set model.h_predictor > 0")
        return simsiam_loss(p_he, out.h_embed_he, p_ihc, out.h_embed_ihc)
    m_he, m_ihc = x.aux("h_map_he"), x.aux("h_map_ihc")
    if m_he is None or m_ihc is None:
        return None
    return spatial_infonce_loss(m_he, m_ihc, x.cfg.h_tau)


@register_term("dab", weight=("stain", "dab"))
def _dab_term(x: LossInputs) -> torch.Tensor:
    mode = _check_mode(x.cfg.dab_mode, DAB_MODES, "loss.dab_mode")
    if mode == "od":
        return dab_od_loss(x.out.ihc, x.ihc, x.rgb_from_hed)
    return dab_l1_loss(x.out.ihc, x.ihc, x.rgb_from_hed)

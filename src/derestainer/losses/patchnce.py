"""ASP's losses (Li et al., "Adaptive supervised PatchNCE loss", MICCAI 2023): CUT's PatchNCE, the
adaptive supervised PatchNCE and ASP's Gaussian-pyramid L1, after the authors' code
(lifangda01/AdaptiveSupervisedPatchNCE: ``models/patchnce.py``, ``models/asp_loss.py``,
``models/gauss_pyramid.py``, ``models/cpt_model.py``).

PatchNCE (Park et al., CUT, ECCV 2020). The generator's encoder features of two images, sampled at
the same ``n`` positions and projected by a 2-layer MLP onto the unit sphere (the ASP generator,
:mod:`derestainer.models.baselines.asp`), give queries ``q`` (generated image) and keys ``k`` (the
other image, detached). For each query patch ``i`` of image ``b``:

    ℓ_bi = −log softmax_j([q_bi·k_bi, q_bi·k_bj for every j]/τ)_0,

the negatives being the keys of the same image (``all_negatives=False``, CUT's and ASP's choice) or
of the whole minibatch; the query's own key among the negatives gets the logit −10 (``exp(−10/τ)``
≈ 0), as theirs does.

- ``nce``: queries = generated image, keys = **the input H&E** (content preservation).
- ``asp``: queries = generated image, keys = **the paired real IHC** (supervised PatchNCE), each
  patch's loss weighted by ``w = p + (1 − p)·f(q·k)`` over the minibatch normalised to mean 1, where
  ``p`` falls with the training progress (the schedule) and ``f`` of the positive's cosine (the
  lookup) down-weights patches whose real IHC disagrees with the generated one. ASP trains with
  ``lambda_linear``: ``p = 1`` up to ``asp_decay_start`` (the start of their learning-rate decay),
  then linearly to 0 at the end; ``f(c) = max(c, 0)``.

Both terms are a mean over patches, then over the NCE layers, as in their ``calculate_NCE_loss``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from derestainer.core.config import ASP_LOOKUPS, ASP_SCHEDULES
from derestainer.losses.elementary import fp32, sep_filter
from derestainer.losses.terms import IHC_INPUT, LossInputs, register_term

#: The logit of a query against its own key among the negatives (theirs: −10 before ÷τ).
SELF_LOGIT = -10.0
#: ASP's Gaussian-pyramid level weights (their launcher's ``gp_weights``), finest level first.
ASP_GP_WEIGHTS = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)
#: The 5-tap binomial of their pyramid's 5×5 kernel (its outer product ÷ 256).
_BINOMIAL5 = (1.0, 4.0, 6.0, 4.0, 1.0)


def _check_pair(feat_q: torch.Tensor, feat_k: torch.Tensor) -> None:
    if feat_q.dim() != 3 or feat_q.shape != feat_k.shape:
        raise ValueError(f"PatchNCE: expected queries and keys [N, n_patches, D] of one shape, "
                         f"got {tuple(feat_q.shape)} and {tuple(feat_k.shape)}")


@fp32
def patchnce_logits(feat_q: torch.Tensor, feat_k: torch.Tensor, all_negatives: bool = False) -> torch.Tensor:
    """Similarity logits (before ÷τ) of every query: the positive first, then every negative.

    Args:
        feat_q, feat_k: ``[N, n, D]`` projected (unit-norm) features at the same ``n`` positions;
            ``feat_k`` is detached here.
        all_negatives: negatives from every image of the minibatch (``N·n`` keys) instead of the
            ``n`` keys of the query's own image.

    Returns:
        ``[N·n, 1 + M]`` (image-major rows): column 0 ``q_bi·k_bi``, then ``q_bi·k_j`` over the
        ``M = n`` (or ``N·n``) keys with :data:`SELF_LOGIT` in the query's own place.
    """
    _check_pair(feat_q, feat_k)
    b, n, d = feat_q.shape
    q, k = feat_q, feat_k.detach()
    pos = (q * k).sum(-1).reshape(b * n, 1)
    if all_negatives:
        q, k = q.reshape(1, b * n, d), k.reshape(1, b * n, d)
    neg = torch.bmm(q, k.transpose(1, 2))
    m = neg.shape[-1]
    neg = neg.masked_fill(torch.eye(m, dtype=torch.bool, device=neg.device), SELF_LOGIT)
    return torch.cat([pos, neg.reshape(b * n, m)], dim=1)


def _nce_from_logits(logits: torch.Tensor, tau: float) -> torch.Tensor:
    if not tau > 0:
        raise ValueError(f"PatchNCE temperature must be > 0, got {tau!r}")
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits / tau, target, reduction="none")


@fp32
def patchnce_loss(feat_q: torch.Tensor, feat_k: torch.Tensor, tau: float = 0.07,
                  all_negatives: bool = False) -> torch.Tensor:
    """CUT's PatchNCE per query patch, ``[N·n]`` (their ``PatchNCELoss``, reduction none).

    ``−log(exp(q·k⁺/τ) / Σ exp(logits/τ))`` with the logits of :func:`patchnce_logits`.
    """
    return _nce_from_logits(patchnce_logits(feat_q, feat_k, all_negatives), tau)


def parse_asp_mode(mode: str) -> tuple[str, str]:
    """``"<schedule>_<lookup>"`` → ``(schedule, lookup)``, each checked (:data:`ASP_SCHEDULES`, :data:`ASP_LOOKUPS`)."""
    parts = mode.split("_")
    if len(parts) != 2 or parts[0] not in ASP_SCHEDULES or parts[1] not in ASP_LOOKUPS:
        raise ValueError(f"loss.asp_mode: expected 'none' or '<schedule>_<lookup>' with a schedule in "
                         f"{', '.join(ASP_SCHEDULES)} and a lookup in {', '.join(ASP_LOOKUPS)}, got {mode!r}")
    return parts[0], parts[1]


def asp_schedule(progress: float, schedule: str = "lambda", decay_start: float = 0.75) -> float:
    """``p(t)``, the share of uniform weighting at training progress ``t`` (their ``current_epoch``-based ``p``).

    ``sigmoid``: ``1 / (1 + e^{10(t − ½)})``; ``linear``: ``1 − t``; ``lambda``: 1 up to
    ``decay_start``, then ``(1 − t)/(1 − decay_start)`` (their ``m − m·t`` with ``k = decay_start``);
    ``zero``: 1 (no adaptation).
    """
    t = float(progress)
    if schedule == "sigmoid":
        return 1.0 / (1.0 + math.exp((t - 0.5) * 10.0))
    if schedule == "linear":
        return 1.0 - t
    if schedule == "lambda":
        if not 0.0 <= decay_start <= 1.0:
            raise ValueError(f"loss.asp_decay_start must be in [0, 1], got {decay_start!r}")
        return 1.0 if t < decay_start or decay_start >= 1.0 else (1.0 - t) / (1.0 - decay_start)
    if schedule == "zero":
        return 1.0
    raise ValueError(f"ASP schedule must be one of {', '.join(ASP_SCHEDULES)}, got {schedule!r}")


def asp_lookup(cos_pos: torch.Tensor, lookup: str = "linear") -> torch.Tensor:
    """The adaptive weight of each patch from its positive's cosine ``c`` (their ``w1``).

    ``top``: ``√(1 − (max(c, 0) − 1)²)``; ``linear``: ``max(c, 0)``; ``bell``: the standard normal
    density at ``4(c − ½)``; ``uniform``: 1.
    """
    c = cos_pos.detach()
    if lookup == "top":
        c = c.clamp_min(0.0)
        return torch.sqrt((1.0 - (c - 1.0) ** 2).clamp_min(0.0))
    if lookup == "linear":
        return torch.relu(c)
    if lookup == "bell":
        return torch.exp(-((c - 0.5) * 4.0) ** 2 / 2.0) / math.sqrt(2.0 * math.pi)
    if lookup == "uniform":
        return torch.ones_like(c)
    raise ValueError(f"ASP lookup must be one of {', '.join(ASP_LOOKUPS)}, got {lookup!r}")


def asp_weights(cos_pos: torch.Tensor, p: float, lookup: str = "linear") -> torch.Tensor:
    """``w = p + (1 − p)·lookup(c)``, scaled to mean 1 over all patches (their normalisation ``w/Σw·len(w)``).

    A zero sum (``p = 0`` and every weight 0) gives zero weights instead of their NaN.
    """
    w = p + (1.0 - p) * asp_lookup(cos_pos, lookup)
    return w / w.sum().clamp_min(torch.finfo(w.dtype).tiny) * w.numel()


@fp32
def adaptive_patchnce_loss(feat_q: torch.Tensor, feat_k: torch.Tensor, progress: float, tau: float = 0.07,
                           mode: str = "lambda_linear", decay_start: float = 0.75,
                           all_negatives: bool = False) -> torch.Tensor:
    """ASP's adaptive supervised PatchNCE per query patch, ``[N·n]`` (their ``AdaptiveSupervisedPatchNCELoss``).

    ``feat_q``: the generated image's projected features, ``feat_k``: the paired real IHC's at the
    same positions (``[N, n, D]``). ``mode`` ``"none"`` is the unweighted supervised PatchNCE; else
    ``"<schedule>_<lookup>"`` (:func:`asp_schedule`, :func:`asp_lookup`) weights each patch's loss
    by :func:`asp_weights` at ``progress`` (fraction of training done).
    """
    logits = patchnce_logits(feat_q, feat_k, all_negatives)
    loss = _nce_from_logits(logits, tau)
    if mode == "none":
        return loss
    schedule, lookup = parse_asp_mode(mode)
    return loss * asp_weights(logits[:, 0], asp_schedule(progress, schedule, decay_start), lookup)


def asp_gaussian_pyramid(x: torch.Tensor, levels: int = len(ASP_GP_WEIGHTS)) -> list[torch.Tensor]:
    """ASP's Gaussian pyramid (their ``Gauss_Pyramid_Conv(num_high=levels − 1)``, after LPTN).

    Level ``l < levels − 1`` is the level-``l`` image blurred once by the 5×5 binomial kernel
    ``[1, 4, 6, 4, 1]ᵀ[1, 4, 6, 4, 1]/256`` (reflection padding); the next image keeps every other
    pixel of that blurred one; the last level is the last image unblurred. Level 0 is thus blurred,
    unlike PyramidPix2Pix's (:func:`derestainer.losses.pyramid.gaussian_pyramid`).

    Raises:
        ValueError: an image too small for ``levels`` (each blurred level needs ≥ 3 px a side).
    """
    if levels < 1:
        raise ValueError(f"asp_gaussian_pyramid: levels must be ≥ 1, got {levels}")
    k = torch.tensor(_BINOMIAL5, device=x.device, dtype=x.dtype) / 16.0
    out, cur = [], x
    for _ in range(levels - 1):
        if min(cur.shape[-2:]) < 3:
            raise ValueError(f"asp_gaussian_pyramid: {levels} levels need images of ≥ {3 * 2 ** (levels - 2)} px a side, "
                             f"got {tuple(x.shape[-2:])}")
        blurred = sep_filter(cur, k, padding="reflect")
        out.append(blurred)
        cur = blurred[..., ::2, ::2]
    out.append(cur)
    return out


@fp32
def asp_pyramid_l1_loss(fake: torch.Tensor, real: torch.Tensor,
                        weights: Sequence[float] = ASP_GP_WEIGHTS) -> torch.Tensor:
    """ASP's pyramid L1: ``mean_l w_l · mean|P_l(ŷ) − P_l(y)|`` over :func:`asp_gaussian_pyramid`'s levels."""
    with torch.no_grad():
        pr = asp_gaussian_pyramid(real, len(weights))
    pf = asp_gaussian_pyramid(fake, len(weights))
    return torch.stack([w * (f - r).abs().mean() for w, f, r in zip(weights, pf, pr)]).mean()


def _layer_mean(qs: Sequence[torch.Tensor] | None, ks: Sequence[torch.Tensor] | None,
                fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    """Mean over NCE layers of the per-layer mean patch loss; None when the generator gave no features."""
    if qs is None or ks is None:
        return None
    if len(qs) != len(ks) or not qs:
        raise ValueError(f"PatchNCE: {len(qs)} query and {len(ks)} key layers")
    return torch.stack([fn(q, k).mean() for q, k in zip(qs, ks)]).mean()


@register_term("nce", weight=("nce",), needs={IHC_INPUT})
def _nce(x: LossInputs) -> torch.Tensor | None:
    c = x.cfg
    return _layer_mean(x.aux("nce_q"), x.aux("nce_k"),
                       lambda q, k: patchnce_loss(q, k, c.nce_tau, c.nce_all_negatives))


@register_term("asp", weight=("asp",), needs={IHC_INPUT})
def _asp(x: LossInputs) -> torch.Tensor | None:
    c = x.cfg
    return _layer_mean(x.aux("nce_sup_q"), x.aux("nce_sup_k"),
                       lambda q, k: adaptive_patchnce_loss(q, k, x.progress, c.nce_tau, c.asp_mode,
                                                           c.asp_decay_start, c.nce_all_negatives))


@register_term("asp_gp", weight=("asp_gp",))
def _asp_gp(x: LossInputs) -> torch.Tensor:
    return asp_pyramid_l1_loss(x.out.ihc, x.ihc)

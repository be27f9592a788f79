"""The registry of generator loss terms: every term of every model, by name, with its weight and its needs.

A term is a function of one :class:`LossInputs` (everything a step has at hand) that returns the
term's **unweighted** value, or ``None`` when its inputs are missing this step. Its weight is the
product of the :class:`~derestainer.core.config.LossConfig` fields it names, so a preset switches a
term off by setting one of them to 0 (and the trainer then skips what only that term needs).

A model module that brings a new loss registers it next to its code::

    @register_term("nce", weight=("nce",), needs={IHC_INPUT})
    def _nce(x: LossInputs) -> torch.Tensor | None:
        ...

What a term may need (``needs``), so that the trainer prepares it only when an active term does:

- :data:`IHC_INPUT`: the generator is called as ``G(he, ihc)`` (f_H's IHC branch, PatchNCE features);
- :data:`D_FEATURES`: the discriminator's intermediate features on real and generated images;
- :data:`COMPARATOR`: the frozen comparator's features of both images;
- :data:`DISCRIMINATOR`: the discriminator's outputs on the generated pair;
- :data:`VGG`: the frozen VGG-19's features of both images (pix2pixHD's perceptual loss).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # only a type here; importing derestainer.models would import every built-in model
    from derestainer.models.base import GenOutput

IHC_INPUT = "ihc_input"
D_FEATURES = "d_features"
COMPARATOR = "comparator"
DISCRIMINATOR = "discriminator"
VGG = "vgg"
NEEDS = (IHC_INPUT, D_FEATURES, COMPARATOR, DISCRIMINATOR, VGG)


@dataclass(frozen=True)
class LossInputs:
    """What one generator step hands to its loss terms.

    Attributes:
        out: the generator's output (``out.ihc`` in model space; ``out.aux`` model-specific tensors).
        he, ihc: ``[N, 3, H, W]`` input H&E and real IHC, model space.
        level: ``[N]`` HER2 level, −1 unknown; ``None`` skips the level terms.
        cfg: a :class:`~derestainer.core.config.LossConfig`.
        rgb_from_hed: the generator's stain matrix (None: Ruifrok).
        d_fake: discriminator outputs on (he, generated) per scale, D frozen; ``None`` skips L_GAN.
        d_fake_feats, d_real_feats: per scale, the discriminator's intermediate feature maps on the
            generated and on the real pair (real ones detached); ``None`` skips feature matching.
        cmp_fake, cmp_real: comparator features of generated / real IHC; ``None`` skips L_cmp.
        vgg_fake, vgg_real: the VGG-19 feature maps of generated / real IHC; ``None`` skips L_VGG.
        progress: fraction of training done, ``step / train.steps`` in ``[0, 1]`` (schedules, late terms).
    """

    out: GenOutput
    he: torch.Tensor
    ihc: torch.Tensor
    level: torch.Tensor | None
    cfg: Any
    rgb_from_hed: torch.Tensor | None = None
    d_fake: Sequence[torch.Tensor] | torch.Tensor | None = None
    d_fake_feats: Sequence[Sequence[torch.Tensor]] | None = None
    d_real_feats: Sequence[Sequence[torch.Tensor]] | None = None
    cmp_fake: torch.Tensor | None = None
    cmp_real: torch.Tensor | None = None
    vgg_fake: Sequence[torch.Tensor] | None = None
    vgg_real: Sequence[torch.Tensor] | None = None
    progress: float = 0.0

    def aux(self, key: str) -> Any:
        """``out.aux[key]``, or ``None`` when the generator did not return it."""
        aux = self.out.aux
        return None if aux is None else aux.get(key)


TermFn = Callable[[LossInputs], "torch.Tensor | None"]


@dataclass(frozen=True)
class Term:
    """One registered term: its function, the config fields whose product is its weight, its needs."""

    name: str
    fn: TermFn
    weight: tuple[str, ...]
    needs: frozenset[str]


#: Every term, in registration order (the order they are computed and summed in).
TERMS: dict[str, Term] = {}


def register_term(name: str, weight: Sequence[str], needs: Iterable[str] = ()) -> Callable[[TermFn], TermFn]:
    """Decorator: register ``fn(LossInputs) -> tensor | None`` as the term ``name``."""
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"term {name!r}: unknown needs {sorted(unknown)}; known: {', '.join(NEEDS)}")

    def deco(fn: TermFn) -> TermFn:
        if name in TERMS:
            raise KeyError(f"loss term {name!r} registered twice")
        TERMS[name] = Term(name, fn, tuple(weight), frozenset(needs))
        return fn

    return deco


def term_weights(loss_cfg: Any) -> dict[str, float]:
    """Effective weight of every term, e.g. ``{'h': stain·h, 'mae': content·mae, …}``."""
    out = {}
    for name, term in TERMS.items():
        w = 1.0
        for f in term.weight:
            w *= float(getattr(loss_cfg, f))
        out[name] = w
    return out


def active_terms(loss_cfg: Any) -> set[str]:
    """Terms with a non-zero weight; lets a trainer skip the discriminator, comparator or IHC branch."""
    return {k for k, w in term_weights(loss_cfg).items() if w != 0.0}


def needs_of(active: Iterable[str]) -> frozenset[str]:
    """Everything the ``active`` terms need (:data:`NEEDS`)."""
    return frozenset().union(*(TERMS[t].needs for t in active if t in TERMS))

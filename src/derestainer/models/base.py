"""What every generator returns, so that the trainer, the exporter and inference treat all models alike."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch


class GenOutput(NamedTuple):
    """Output of a generator's ``forward(he, ihc=None)``.

    Attributes:
        ihc: generated IHC, ``[N, 3, H, W]`` in model space ``[-1, 1]``.
        level_logits: ``[N, n_levels]`` HER2 logits (f_level), or ``None`` for models without one.
        h_embed_he: f_H embedding of the H&E H-channel ``[N, D]``, or ``None``.
        h_embed_ihc: f_H embedding of the real IHC H-channel ``[N, D]``; only when ``ihc`` was given
            to ``forward`` (training), else ``None``.
        aux: model-specific training outputs that a registered loss term reads
            (:class:`derestainer.losses.terms.LossInputs`), e.g. f_H's feature maps (``h_map_he``,
            ``h_map_ihc``), the SimSiam predictor's outputs, PatchNCE features, a low-resolution
            output; ``None`` at inference.
    """

    ihc: torch.Tensor
    level_logits: torch.Tensor | None = None
    h_embed_he: torch.Tensor | None = None
    h_embed_ihc: torch.Tensor | None = None
    aux: Mapping[str, Any] | None = None

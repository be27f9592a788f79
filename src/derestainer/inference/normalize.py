"""``translate-slide --normalize``: fit a stain normaliser once per slide, on its thumbnail's tissue.

The numerics are :mod:`derestainer.stain.normalize`; this module picks the target and fits on the
pixels of :func:`~.plan.select_tiles`' thumbnail under its tissue mask. The fitted normaliser is a
pixel-wise function applied to every tile read (:func:`~.plan.read_model_region`), and its record
goes into the resume settings and the provenance.

Targets:

- **macenko**: the stain matrix of the model's DeStainer (the buffer ``destainer.separation.rgb_from_hed``
  of the weights: the matrix the model separates H with, from its config's ``model.stain_matrix``,
  Ruifrok–Johnston by default), else — a generator without one — scikit-image's Ruifrok–Johnston
  ``rgb_from_hed``. No model file records the training images' stain *amounts*, so the slide's own
  99th-percentile concentrations are kept (scale 1): only the stain colours are mapped.
- **reinhard**: would need the training images' L*a*b* mean and standard deviation, which no model file
  records; refused rather than invented.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from derestainer.core.errors import SlideError
from derestainer.inference.loading import LoadedModel
from derestainer.inference.plan import TileSelection
from derestainer.models.files import STAIN_BUFFER
from derestainer.stain.matrices import RGB_FROM_HED
from derestainer.stain.normalize import NormalizeMethod, StainNormalizer, fit_macenko


def model_stain_matrix(lm: LoadedModel) -> tuple[np.ndarray, str]:
    """The Macenko target: ``(rgb_from_hed [3, 3], where it came from)`` (module docstring)."""
    for name, buf in lm.model.named_buffers():
        if name == STAIN_BUFFER or name.endswith("." + STAIN_BUFFER):
            cfg = lm.meta.get("config")
            model_cfg = cfg.get("model") if isinstance(cfg, dict) else None
            spec = model_cfg.get("stain_matrix") if isinstance(model_cfg, dict) else None
            return buf.detach().double().cpu().numpy(), f"model file ({STAIN_BUFFER}; model.stain_matrix={spec!r})"
    return RGB_FROM_HED.copy(), "ruifrok (skimage.color.rgb_from_hed; the model file records no stain matrix)"


def check_normalize(method: NormalizeMethod, lm: LoadedModel) -> None:
    """Refuses, before any slide, a method the model file cannot give a target for.

    Raises:
        SlideError: ``reinhard`` (no model file records the training data's colour statistics).
    """
    if method == "reinhard":
        raise SlideError(f"--normalize reinhard needs the training data's colour statistics, which {lm.path} "
                         f"does not record; use macenko")
    if method not in ("none", "macenko"):
        raise SlideError(f"--normalize must be none, macenko or reinhard, got {method!r}")


def fit_slide_normalizer(method: NormalizeMethod, lm: LoadedModel, sel: TileSelection,
                         slide: Path) -> StainNormalizer | None:
    """The slide's normaliser (None for ``none``), fitted on the thumbnail's tissue pixels.

    Raises:
        SlideError: a method without a target (:func:`check_normalize`), or too little tissue to fit on.
    """
    check_normalize(method, lm)
    if method == "none":
        return None
    target, source = model_stain_matrix(lm)
    try:
        return fit_macenko(sel.thumb[sel.mask], target, None, target=source)
    except ValueError as exc:
        raise SlideError(f"{slide}: --normalize macenko cannot be fitted on the thumbnail's tissue ({exc})") from None


def normalization_record(normalizer: StainNormalizer | None) -> dict[str, Any] | None:
    """What the resume settings and the provenance record of the normalisation (None without one)."""
    return None if normalizer is None else dict(normalizer.record)


__all__ = ["check_normalize", "fit_slide_normalizer", "model_stain_matrix", "normalization_record"]

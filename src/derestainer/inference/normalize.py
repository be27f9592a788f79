"""``translate-slide --normalize``: fit a stain normaliser once per slide, on tissue tiles at the model's resolution.

The numerics are :mod:`derestainer.stain.normalize`; this module picks the target and fits on the
tissue pixels of up to :data:`~.stain_reference.SLIDE_TILES` of the slide's tissue tiles, read at
the model's µm/px (:func:`~.stain_reference.slide_tissue_pixels`: the scale the target was measured
at). The fitted normaliser is a pixel-wise function applied to every tile read
(:func:`~.plan.read_model_region`), and its record goes into the resume settings and the provenance.

Targets:

- the model file's ``stain_reference`` (:mod:`.stain_reference`, written by ``export``): the training
  H&E's Macenko H and E vectors *and* their 99th-percentile concentrations (the amounts of stain
  are matched too) for **macenko**; its L*a*b* mean and standard deviation for **reinhard**.
- without one, **macenko** maps the colours only: the stain matrix of the model's DeStainer (the
  buffer ``destainer.separation.rgb_from_hed``, from its config's ``model.stain_matrix``,
  Ruifrok–Johnston by default), else scikit-image's Ruifrok–Johnston ``rgb_from_hed``; the slide's own
  amounts are kept (scale 1). **reinhard** is refused rather than invented.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from derestainer.core.errors import SlideError
from derestainer.inference.loading import LoadedModel
from derestainer.inference.plan import SlidePlan, TileSelection
from derestainer.inference.slides import SlideReader
from derestainer.inference.stain_reference import REFERENCE_VERSION, slide_tissue_pixels
from derestainer.models.files import STAIN_BUFFER
from derestainer.stain.matrices import RGB_FROM_HED, stain_matrix_from_vectors
from derestainer.stain.normalize import NormalizeMethod, StainNormalizer, fit_macenko, fit_reinhard


def model_stain_matrix(lm: LoadedModel) -> tuple[np.ndarray, str]:
    """The Macenko target: ``(rgb_from_hed [3, 3], where it came from)`` (module docstring)."""
    for name, buf in lm.model.named_buffers():
        if name == STAIN_BUFFER or name.endswith("." + STAIN_BUFFER):
            cfg = lm.meta.get("config")
            model_cfg = cfg.get("model") if isinstance(cfg, dict) else None
            spec = model_cfg.get("stain_matrix") if isinstance(model_cfg, dict) else None
            return buf.detach().double().cpu().numpy(), f"model file ({STAIN_BUFFER}; model.stain_matrix={spec!r})"
    return RGB_FROM_HED.copy(), "ruifrok (skimage.color.rgb_from_hed; the model file records no stain matrix)"


def training_stain(lm: LoadedModel) -> dict[str, Any] | None:
    """The model file's ``stain_reference`` (:mod:`.stain_reference`), or None when it records none."""
    ref = lm.meta.get("stain_reference")
    return ref if isinstance(ref, dict) and ref.get("version") == REFERENCE_VERSION else None


def check_normalize(method: NormalizeMethod, lm: LoadedModel) -> None:
    """Refuses, before any slide, a method the model file cannot give a target for.

    Raises:
        SlideError: ``reinhard`` with a model file that records no training stain (:func:`training_stain`).
    """
    if method == "reinhard" and training_stain(lm) is None:
        raise SlideError(f"--normalize reinhard needs the training data's colour statistics, which {lm.path} "
                         f"does not record: export it with --stain-reference TRAINING_HE_FOLDER, or use macenko")
    if method not in ("none", "macenko", "reinhard"):
        raise SlideError(f"--normalize must be none, macenko or reinhard, got {method!r}")


def fit_slide_normalizer(method: NormalizeMethod, lm: LoadedModel, reader: SlideReader, plan: SlidePlan,
                         sel: TileSelection, slide: Path) -> StainNormalizer | None:
    """The slide's normaliser (None for ``none``), fitted on tissue tiles at the model's resolution.

    Raises:
        SlideError: a method without a target (:func:`check_normalize`), or too little tissue to fit on.
    """
    check_normalize(method, lm)
    if method == "none":
        return None
    pixels = slide_tissue_pixels(reader, plan, sel)
    ref = training_stain(lm)
    try:
        if method == "reinhard":
            assert ref is not None  # check_normalize
            return fit_reinhard(pixels, ref["lab_mean"], ref["lab_std"], target=f"training data ({ref['source']})")
        if ref is not None and ref.get("macenko"):
            m = ref["macenko"]
            return fit_macenko(pixels, stain_matrix_from_vectors(h=m["h"], e=m["e"]), np.asarray(m["percentiles"]),
                               target=f"training data ({ref['source']})")
        target, source = model_stain_matrix(lm)
        return fit_macenko(pixels, target, None, target=source)
    except ValueError as exc:
        raise SlideError(f"{slide}: --normalize {method} cannot be fitted on the slide's tissue tiles "
                         f"({len(pixels)} tissue pixels: {exc})") from None


def normalization_record(normalizer: StainNormalizer | None) -> dict[str, Any] | None:
    """What the resume settings and the provenance record of the normalisation (None without one)."""
    return None if normalizer is None else dict(normalizer.record)


__all__ = ["check_normalize", "fit_slide_normalizer", "model_stain_matrix", "normalization_record", "training_stain"]

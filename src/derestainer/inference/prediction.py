"""One batch through a generator: size padding, test-time augmentation, precision, resolution.

:func:`predict` works on model-space tensors (``[-1, 1]``) and is shared by patch, folder and
whole-slide inference; :func:`translate_array` wraps it for ``uint8`` images.

Sizes: a generator needs height and width divisible by ``2^n_down`` (DeReStainer: 8). Inputs are
padded by reflection up to the next multiple and the output is cropped back, so the output has
the input's size. Resolution: the model was trained at ``mpp`` µm/px (stored in the model file);
``input_mpp`` (when given) resizes each image to that resolution before the model and resizes the
result back to the input size; otherwise images are assumed to be at the training resolution.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from derestainer.core import resample
from derestainer.core.ranges import signed_to_uint8, uint8_to_signed
from derestainer.inference.loading import LoadedModel
from derestainer.inference.optimize import InferenceModel
from derestainer.inference.precision import Precision, ResolvedPrecision, autocast_context, check_precision, plain_precision


def pad_to_multiple(x: torch.Tensor, multiple: int, min_size: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad ``[N, C, H, W]`` at the bottom/right up to multiples of ``multiple`` (and at least ``min_size``).

    Reflection padding (no dark border for the network to react to); replication where the image
    is too small to reflect.

    Returns:
        (padded tensor, original ``(H, W)``) — crop with ``y[..., :H, :W]``.
    """
    h, w = x.shape[-2:]
    th = max(-(-h // multiple) * multiple, min_size)
    tw = max(-(-w // multiple) * multiple, min_size)
    ph, pw = th - h, tw - w
    if ph == 0 and pw == 0:
        return x, (h, w)
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 symmetries of the square (k = 0..7) applied to the last two dims.

    ``k % 4`` quarter turns, preceded by a horizontal flip when ``k ≥ 4``.
    """
    if k >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k % 4, dims=(-2, -1))


def inverse_dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`dihedral` (``inverse_dihedral(dihedral(x, k), k) == x``)."""
    x = torch.rot90(x, -(k % 4), dims=(-2, -1))
    if k >= 4:
        x = torch.flip(x, dims=(-1,))
    return x


def resolved_precision(model: torch.nn.Module, device: torch.device, precision: str = "auto") -> ResolvedPrecision:
    """The precision ``predict(model, ..., precision=precision)`` really runs at: ``fp32`` or ``bf16``.

    An :class:`~.optimize.InferenceModel` (the fast path) applies its own precision, fixed when it was
    built (``load_model(..., precision=...)``); ``precision`` must then be ``auto`` or that same value.
    A plain model follows :func:`~.precision.plain_precision`: ``auto`` is bf16 autocast on CUDA (the
    whole model, stain separation included) and fp32 elsewhere.

    Raises:
        ValueError: an unknown ``precision``, or an explicit one other than the one an InferenceModel
            was built with.
    """
    asked = check_precision(precision)
    if isinstance(model, InferenceModel):
        if asked != "auto" and asked != model.precision:
            raise ValueError(
                f"precision={asked!r} asked for, but this InferenceModel was built to run in "
                f"{model.precision!r}; rebuild it with precision={asked!r} (load_model(..., precision=...)) "
                f"or pass precision='auto'")
        return model.precision
    return plain_precision(device, asked)


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    he: torch.Tensor,
    *,
    multiple: int = 1,
    tta: bool = False,
    precision: Precision = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batch through a generator.

    Args:
        model: generator in eval mode (``forward(he) -> GenOutput``).
        he: ``[N, 3, H, W]`` in ``[-1, 1]`` on the model's device (any H, W: padded to ``multiple``).
        multiple: size multiple the model needs.
        tta: average the 8 dihedral transforms (each output transformed back before averaging;
            level probabilities averaged too).
        precision: for a plain model, ``auto`` (bf16 autocast on CUDA — the whole model, stain
            separation included — fp32 elsewhere), ``bf16`` or ``fp32``. An
            :class:`~.optimize.InferenceModel` runs at the precision it was built with (its
            ``precision``, stain separation kept fp32) and no outer autocast is applied; ``auto``
            or that same precision is accepted (see :func:`resolved_precision`).

    Returns:
        (virtual IHC float32 ``[N, 3, H, W]`` in ``[-1, 1]``, level probabilities float32 ``[N, K]`` or None).

    Raises:
        ValueError: ``precision`` conflicts with the precision an InferenceModel was built with.
    """
    resolved_precision(model, he.device, precision)  # refuses a conflicting precision
    fast = isinstance(model, InferenceModel)
    x, (h, w) = pad_to_multiple(he, multiple, min_size=2 * multiple)
    ks = range(8) if tta else (0,)
    ihc_sum: torch.Tensor | None = None
    prob_sum: torch.Tensor | None = None
    for k in ks:
        with contextlib.nullcontext() if fast else autocast_context(x.device, precision):
            out = model(dihedral(x, k))
        y = inverse_dihedral(out.ihc.float(), k)
        ihc_sum = y if ihc_sum is None else ihc_sum + y
        if out.level_logits is not None:
            p = torch.softmax(out.level_logits.float(), dim=1)
            prob_sum = p if prob_sum is None else prob_sum + p
    assert ihc_sum is not None
    ihc = (ihc_sum / len(ks))[..., :h, :w]
    probs = None if prob_sum is None else prob_sum / len(ks)
    return ihc, probs


def resize_batch(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[N, C, H, W]`` with antialiasing when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


#: Where :func:`translate_array` leaves its output: at the input's size, or at the model's working size.
OUTPUT_SIZES: tuple[str, ...] = ("input", "model")

#: How inputs are brought to the model's µm/px (the training data loader's filter, :mod:`derestainer.data.transforms`).
INPUT_RESIZE: str = "torch.nn.functional.interpolate(mode='bilinear', align_corners=False, antialias when shrinking)"


def translate_array(
    lm: LoadedModel,
    images: Sequence[np.ndarray],
    *,
    tta: bool = False,
    input_mpp: float | None = None,
    precision: Precision = "auto",
    output_size: str = "input",
    resize_filter: str = resample.DEFAULT_FILTER,
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Translate same-sized ``uint8 [H, W, 3]`` H&E images (one batch).

    With ``input_mpp`` the images are resampled to the model's µm/px first (:data:`INPUT_RESIZE`).
    The generated image is made uint8 at that working size; ``output_size='input'`` then brings it
    back to the input's size with :func:`derestainer.core.resample.resize_rgb` and ``resize_filter``
    — the very resize ``evaluate`` applies to a prediction of another size than its ground truth,
    so translating at the model's size and evaluating gives the same numbers as translating back.

    Returns:
        (virtual IHC ``uint8 [H, W, 3]`` per image, probabilities ``[N, K]`` or None).
    """
    if output_size not in OUTPUT_SIZES:
        raise ValueError(f"output_size must be one of {OUTPUT_SIZES}, got {output_size!r}")
    resample.check_filter(resize_filter)
    if not images:
        return [], None
    x = torch.from_numpy(np.stack([np.ascontiguousarray(im.transpose(2, 0, 1)) for im in images]))
    x = uint8_to_signed(x.to(lm.device))
    h, w = x.shape[-2:]
    if input_mpp is not None and input_mpp > 0 and abs(input_mpp / lm.mpp - 1) > 1e-6:
        f = input_mpp / lm.mpp  # model px per input px
        x = resize_batch(x, (max(1, round(h * f)), max(1, round(w * f))))
    ihc, probs = predict(lm.model, x, multiple=lm.multiple, tta=tta, precision=precision)
    out = list(signed_to_uint8(ihc).permute(0, 2, 3, 1).cpu().numpy())
    if output_size == "input":
        out = [resample.resize_rgb(o, (int(h), int(w)), resize_filter) for o in out]
    return out, (None if probs is None else probs.cpu().numpy())


__all__ = ["INPUT_RESIZE", "OUTPUT_SIZES", "dihedral", "inverse_dihedral", "pad_to_multiple", "predict", "resize_batch", "resolved_precision",
           "translate_array"]

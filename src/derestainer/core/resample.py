"""The one resize between a generated image and the size it is scored or saved at.

A generated IHC image is made at the model's working resolution (e.g. 512 px for BCI) and compared
with a ground truth of another size (1024 px). Whether that resize happens when ``translate`` writes
its output or when ``evaluate`` reads it, it is this function with a named filter, on ``uint8`` RGB,
so that every route to a Table-1 number applies exactly the same resampling (docs/evaluation.md,
"Pixel metrics"), and the filter that was applied is what the report records.

The filters are Pillow's (``Image.resize``): a well-kept reference implementation that the BCI
evaluation code also uses. Pillow widens every kernel but ``nearest`` when *down*-sizing
(antialiasing); up-sizing applies the kernel as is.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from derestainer.core.errors import ConfigError

#: Filter names → Pillow filters. ``bicubic`` (Keys cubic, a = −0.5) is the documented protocol.
FILTERS: dict[str, Image.Resampling] = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}

#: The protocol's filter (the paper: "resized to 1024 × 1024 for evaluation"; the BCI code: PIL bicubic).
DEFAULT_FILTER: str = "bicubic"

#: Largest relative difference of aspect ratios still treated as "the same shape"; a small image may
#: differ by more where one pixel of rounding explains it (one side within 1 px of the other side
#: scaled exactly: 50×37 px made at half size is 25×18). Anything else would be a distortion.
ASPECT_TOLERANCE: float = 0.01


def check_filter(name: str) -> str:
    """``name`` if it is one of :data:`FILTERS`.

    Raises:
        ConfigError: an unknown filter (the message lists the known ones).
    """
    if name not in FILTERS:
        raise ConfigError(f"unknown resize filter {name!r}; choose one of {', '.join(FILTERS)}")
    return name


def describe(name: str) -> str:
    """How :func:`resize_rgb` resizes with filter ``name``, in words (written into reports)."""
    return f"PIL Image.resize(..., Image.Resampling.{FILTERS[check_filter(name)].name}) on uint8 RGB"


def resize_rgb(image: np.ndarray, size_hw: tuple[int, int], filter: str = DEFAULT_FILTER) -> np.ndarray:
    """Resize ``uint8 [h, w, 3]`` to ``size_hw = (H, W)`` with ``filter``; the same array when already that size.

    Raises:
        ValueError: not uint8 RGB, or the aspect ratios differ by more than :data:`ASPECT_TOLERANCE` and
            one pixel of rounding (a resize would distort the image: the pair is probably wrong).
        ConfigError: an unknown filter.
    """
    resample = FILTERS[check_filter(filter)]
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB [H, W, 3], got {a.dtype} {a.shape}")
    h, w = int(size_hw[0]), int(size_hw[1])
    if a.shape[:2] == (h, w):
        return a
    src, dst = a.shape[1] / a.shape[0], w / h
    # one pixel of rounding: either side within 1 px of the other side scaled exactly
    rounding = min(abs(a.shape[1] - w * a.shape[0] / h), abs(a.shape[0] - h * a.shape[1] / w)) <= 1.0
    if abs(src / dst - 1.0) > ASPECT_TOLERANCE and not rounding:
        raise ValueError(
            f"aspect ratio differs: prediction is {a.shape[1]}x{a.shape[0]} px, ground truth {w}x{h} px; "
            "resizing would distort it (is this the right pair?)"
        )
    return np.asarray(Image.fromarray(a).resize((w, h), resample))


__all__ = ["ASPECT_TOLERANCE", "DEFAULT_FILTER", "FILTERS", "check_filter", "describe", "resize_rgb"]

"""The geometry of a whole-slide output: the slide's own (``native``) or the model's (``model``).

The model runs at its training µm/px (:mod:`.plan`), so its output has ``round(W0 / scale) ×
round(H0 / scale)`` pixels. With ``native`` (the default), that output is resampled back to the
slide's level-0 size and µm/px before it is written, so that the virtual IHC and the H&E share
pixel coordinates: a QuPath project holds both, and annotations drawn on one fall on the same
tissue in the other. ``model`` writes the model-resolution image as it is (smaller, faster).

The resampling is streamed (:func:`resample_rows`): it holds a window of model-resolution rows
(the rows the next chunk of output rows needs, with the filter's support) and one chunk of output
rows, never the whole image. Each chunk is Pillow's bicubic resize of that window over the exact
fractional source box, which is what a resize of the whole image computes for those rows (equal
up to rounding, tested); bicubic rather than Lanczos because upsampling a smooth virtual stain with
Lanczos rings at membranes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Literal

import numpy as np
from PIL import Image

from derestainer.inference.plan import SlidePlan
from derestainer.inference.tiling import HighWater

Geometry = Literal["native", "model"]
GEOMETRIES: tuple[str, ...] = ("native", "model")
#: Source pixels either side of a bicubic sample (Pillow's bicubic has support 2).
_SUPPORT = 2


def output_geometry(plan: SlidePlan, slide_size: tuple[int, int], geometry: Geometry) -> tuple[int, int, float]:
    """``(width, height, µm/px)`` of the written image: level 0 of the slide, or the model's grid."""
    if geometry == "native":
        return int(slide_size[0]), int(slide_size[1]), float(plan.slide_mpp)
    if geometry == "model":
        return plan.width, plan.height, float(plan.model_mpp)
    raise ValueError(f"unknown geometry {geometry!r}; choose one of {', '.join(GEOMETRIES)}")


def resample_rows(bands: Iterable[np.ndarray], src_size: tuple[int, int], dst_size: tuple[int, int],
                  chunk: int = 256, held: HighWater | None = None) -> Iterator[np.ndarray]:
    """Resample a stream of full-width uint8 row blocks of a ``src_size`` (width, height) image to
    ``dst_size``, yielding full-width blocks of at most ``chunk`` rows, top to bottom.

    ``held`` (optional) counts the source rows kept; its ``max`` is at most the rows one chunk needs
    plus one incoming block. The same sizes give the blocks unchanged.
    """
    (sw, sh), (dw, dh) = src_size, dst_size
    if (sw, sh) == (dw, dh):
        yield from bands
        return
    ry = sh / dh  # source rows per output row (the horizontal ratio is Pillow's, from the box and the sizes)
    pad = math.ceil(_SUPPORT * max(ry, 1.0)) + 1
    buf: list[np.ndarray] = []
    top = 0  # source row index of buf's first row
    have = 0  # source rows in buf
    it = iter(bands)
    for y0 in range(0, dh, chunk):
        y1 = min(dh, y0 + chunk)
        s0, s1 = y0 * ry, y1 * ry
        lo, hi = max(0, math.floor(s0) - pad), min(sh, math.ceil(s1) + pad)
        while top + have < hi:
            block = next(it, None)
            if block is None:
                raise ValueError(f"the row blocks end at row {top + have} of {sh}")
            buf.append(block)
            have += block.shape[0]
            if held is not None:
                held.take(block.shape[0])
        window = np.concatenate(buf, axis=0)[lo - top: hi - top] if len(buf) > 1 else buf[0][lo - top: hi - top]
        img = Image.fromarray(np.ascontiguousarray(window)).resize(
            (dw, y1 - y0), Image.Resampling.BICUBIC, box=(0.0, s0 - lo, sw * 1.0, s1 - lo))
        yield np.asarray(img)
        # drop the rows no later chunk needs
        keep_from = max(0, math.floor(y1 * ry) - pad)
        buf, top, have = _drop_before(buf, top, keep_from, held)
    for _ in it:  # the source must be consumed (it may be a generator with work after its last block)
        pass


def _drop_before(buf: list[np.ndarray], top: int, row: int, held: HighWater | None) -> tuple[list[np.ndarray], int, int]:
    """``buf`` without its rows before source row ``row``: (blocks, new top, rows held)."""
    out = list(buf)
    while out and top + out[0].shape[0] <= row:
        n = out.pop(0).shape[0]
        if held is not None:
            held.release(n)
        top += n
    if out and top < row:  # cut the first block
        cut = row - top
        out[0] = out[0][cut:]
        if held is not None:
            held.release(cut)
        top = row
    return out, top, sum(b.shape[0] for b in out)


__all__ = ["GEOMETRIES", "Geometry", "output_geometry", "resample_rows"]

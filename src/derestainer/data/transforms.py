"""Synchronised transforms for paired H&E / IHC images, and the uint8 ↔ model-space conversions.

Every random decision (crop box, flips, 90° rotation) is drawn **once per pair** and applied to both
images, so that the IHC stays registered to its H&E. Work is split in two parts:

* :meth:`PairedTransform.prepare` — deterministic resizing to the training size. A dataset with
  ``cache=True`` stores its output, so that 1024 px PNGs are decoded and resized once, not every step.
* :meth:`PairedTransform.augment` — the random part: an identical crop, then horizontal flip,
  vertical flip and ``k`` quarter turns (together the 8 symmetries of the square, each equally likely).

Resizing (:func:`resize_uint8`) defaults to **antialiased bilinear** — PIL's ``Image.resize`` filter
and torchvision's ``Resize(antialias=True)``: a triangle filter widened by the scale factor, so that a
1024 → 512 reduction (the paper's BCI setting) does not alias. ``interpolation='area'`` averages
each output pixel's footprint instead (an exact 2×2 mean for a 2× reduction); ``'bicubic'``
(antialiased) and ``'nearest'`` are also offered. Results are rounded back to ``uint8``.

Randomness and DataLoader workers
---------------------------------
Each :class:`PairedTransform` owns a :class:`torch.Generator`. In the main process it is seeded with
``seed`` (or, when ``seed`` is None, with :func:`torch.initial_seed`, so ``torch.manual_seed`` makes
it reproducible). Inside a DataLoader worker, the first call re-seeds it from ``seed`` mixed with the
worker's own seed (``get_worker_info().seed`` = the loader's per-epoch base seed + worker id). Hence

* workers never share a random stream (no duplicated augmentations across workers),
* each epoch draws new augmentations (the loader draws a new base seed per epoch), and
* a run is reproducible: the same ``seed`` and the same loader ``generator=`` (or ``torch.manual_seed``)
  give identical batches, whatever the machine.

Which worker serves which sample depends on ``num_workers``, so changing it changes the augmentations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from derestainer.core.ranges import signed_to_uint8, uint8_to_signed

if TYPE_CHECKING:
    from derestainer.core.config import DataConfig

INTERPOLATIONS: tuple[str, ...] = ("bilinear", "area", "bicubic", "nearest")

Size = int | tuple[int, int] | None


# ----------------------------------------------------------------------------- model space
def to_model_space(image: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``uint8`` image(s), any shape (``[3,H,W]`` or ``[N,3,H,W]``) → float in ``[-1, 1]``: ``x/127.5 − 1``."""
    if image.dtype != torch.uint8:
        raise TypeError(f"to_model_space expects a uint8 tensor, got {image.dtype}")
    return uint8_to_signed(image, dtype)


def from_model_space(image: torch.Tensor) -> torch.Tensor:
    """Float in ``[-1, 1]`` (any shape) → ``uint8``: ``round((x+1)·127.5)``, clamped; exact inverse of
    :func:`to_model_space` on its outputs."""
    if not image.is_floating_point():
        raise TypeError(f"from_model_space expects a float tensor, got {image.dtype}")
    return signed_to_uint8(image)


# ----------------------------------------------------------------------------- pure helpers
def resized_shape(height: int, width: int, size: Size) -> tuple[int, int]:
    """Output ``(H, W)`` for ``size``: None → unchanged; ``(h, w)`` → exactly that; an int → the shorter
    side becomes ``size`` and the aspect ratio is kept (torchvision's rule, so a square image becomes
    ``size × size``)."""
    if size is None or size == 0:
        return height, width
    if isinstance(size, (tuple, list)):
        h, w = (int(s) for s in size)
        if h <= 0 or w <= 0:
            raise ValueError(f"resize size must be positive, got {size}")
        return h, w
    s = int(size)
    if s < 0:
        raise ValueError(f"resize size must be positive, got {size}")
    if height <= width:
        return s, max(1, int(s * width / height))
    return max(1, int(s * height / width)), s


def resize_uint8(image: torch.Tensor, out_hw: tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """Resize ``uint8 [C,H,W]`` (or ``[N,C,H,W]``) to ``out_hw``; bilinear/bicubic are antialiased when
    reducing. Returns ``uint8`` (rounded, clamped). A no-op when the size already matches."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose one of {INTERPOLATIONS}")
    if tuple(image.shape[-2:]) == tuple(out_hw):
        return image
    x = image if image.ndim == 4 else image[None]
    x = x.float()
    if interpolation in ("bilinear", "bicubic"):
        y = F.interpolate(x, size=out_hw, mode=interpolation, align_corners=False, antialias=True)
    else:
        y = F.interpolate(x, size=out_hw, mode=interpolation)
    y = y.round_().clamp_(0, 255).to(torch.uint8)
    return y if image.ndim == 4 else y[0]


@dataclass(frozen=True)
class PairParams:
    """One draw of the random part, applied identically to both images of a pair.

    Order: crop ``[top:top+height, left:left+width]`` (None = no crop) → horizontal flip →
    vertical flip → ``rot90`` by ``k`` quarter turns (counter-clockwise, :func:`torch.rot90`).
    """

    crop: tuple[int, int, int, int] | None = None  # (top, left, height, width)
    hflip: bool = False
    vflip: bool = False
    k: int = 0


def apply_params(image: torch.Tensor, params: PairParams) -> torch.Tensor:
    """Apply :class:`PairParams` to ``[..., H, W]`` (any dtype). Returns a contiguous tensor."""
    if params.crop is not None:
        top, left, h, w = params.crop
        if top < 0 or left < 0 or top + h > image.shape[-2] or left + w > image.shape[-1]:
            raise ValueError(f"crop {params.crop} does not fit an image of size {tuple(image.shape[-2:])}")
        image = image[..., top:top + h, left:left + w]
    if params.hflip:
        image = image.flip(-1)
    if params.vflip:
        image = image.flip(-2)
    if params.k % 4:
        image = torch.rot90(image, params.k % 4, dims=(-2, -1))
    return image.contiguous()


def sample_params(
    height: int,
    width: int,
    crop: int | tuple[int, int] = 0,
    flip: bool = True,
    rot90: bool = True,
    generator: torch.Generator | None = None,
) -> PairParams:
    """Draw crop box, flips and quarter turns for an image of ``height × width``.

    ``crop`` 0 means no crop. Quarter turns by 90°/270° are only drawn when the (cropped) image is
    square, so that every sample of a batch keeps the same shape; otherwise ``k ∈ {0, 2}``.
    """
    box = None
    if crop:
        ch, cw = (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))
        if ch > height or cw > width:
            raise ValueError(f"crop {ch}x{cw} is larger than the image ({height}x{width}); lower data.crop or raise data.size")
        top = int(torch.randint(0, height - ch + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - cw + 1, (1,), generator=generator))
        box = (top, left, ch, cw)
        height, width = ch, cw
    hflip = vflip = False
    if flip:
        hflip, vflip = (bool(b) for b in torch.randint(0, 2, (2,), generator=generator))
    k = 0
    if rot90:
        k = int(torch.randint(0, 4, (1,), generator=generator))
        if height != width:
            k = 2 * (k % 2)
    return PairParams(crop=box, hflip=hflip, vflip=vflip, k=k)


def _mix_seeds(*seeds: int) -> int:
    """A well-spread 63-bit seed from several integers (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(s) % (2**64) for s in seeds]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


# ----------------------------------------------------------------------------- the transform
class PairedTransform:
    """Resize, identical random crop, flips and 90° rotations for an (H&E, IHC) pair of ``uint8 [3,H,W]``.

    Args:
        size: training size (see :func:`resized_shape`); None or 0 keeps the original size.
        crop: side of the random square crop taken after resizing (or ``(h, w)``); 0 = no crop.
        flip: random horizontal and vertical flips.
        rot90: random quarter turns (only 0°/180° for non-square outputs).
        seed: seed of the transform's generator; see the module docstring for DataLoader workers.
        interpolation: ``bilinear`` (antialiased, default) | ``area`` | ``bicubic`` | ``nearest``.

    ``transform(he, ihc) -> (he, ihc)``; both images must have the same size.
    """

    def __init__(
        self,
        size: Size = None,
        crop: int | tuple[int, int] = 0,
        flip: bool = True,
        rot90: bool = True,
        seed: int | None = None,
        interpolation: str = "bilinear",
    ) -> None:
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {interpolation!r}; choose one of {INTERPOLATIONS}")
        if isinstance(crop, int) and crop < 0:
            raise ValueError(f"crop must be >= 0, got {crop}")
        self.size = size
        self.crop = crop
        self.flip = bool(flip)
        self.rot90 = bool(rot90)
        self.seed = seed
        self.interpolation = interpolation
        self._gen: torch.Generator | None = None
        self._owner: tuple[Any, ...] | None = None

    @property
    def is_random(self) -> bool:
        """False when the transform is deterministic (resize only)."""
        return bool(self.crop) or self.flip or self.rot90

    # -- generator handling (see the module docstring)
    def generator(self) -> torch.Generator:
        """This process's generator, (re-)seeded on first use in each process / DataLoader worker."""
        info = torch.utils.data.get_worker_info()
        owner = (os.getpid(), None if info is None else info.id, None if info is None else info.seed)
        if self._gen is None or owner != self._owner:
            if info is None:
                s = self.seed if self.seed is not None else torch.initial_seed()
            else:
                s = _mix_seeds(0 if self.seed is None else self.seed, info.seed)
            self._gen = torch.Generator().manual_seed(int(s) & ((1 << 63) - 1))
            self._owner = owner
        return self._gen

    def reseed(self, seed: int | None) -> None:
        """Set a new seed; the generator restarts from it on next use."""
        self.seed = seed
        self._gen = None

    def __getstate__(self) -> dict[str, Any]:
        # a spawned worker gets a fresh generator, seeded as documented
        state = dict(self.__dict__)
        state["_gen"] = None
        state["_owner"] = None
        return state

    # -- the two parts
    def output_shape(self, height: int, width: int) -> tuple[int, int]:
        """``(H, W)`` of :meth:`prepare`'s output for an input of ``height × width``."""
        return resized_shape(height, width, self.size)

    def prepare(self, he: torch.Tensor, ihc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Deterministic part: resize both images to the training size (safe to cache)."""
        _check_same_shape(he, ihc)
        out = self.output_shape(he.shape[-2], he.shape[-1])
        return resize_uint8(he, out, self.interpolation), resize_uint8(ihc, out, self.interpolation)

    def sample(self, height: int, width: int) -> PairParams:
        """Draw the random parameters for a prepared pair of ``height × width``."""
        if not self.is_random:
            return PairParams()
        return sample_params(height, width, self.crop, self.flip, self.rot90, self.generator())

    def augment(
        self, he: torch.Tensor, ihc: torch.Tensor, params: PairParams | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random part: one :class:`PairParams` draw (or ``params``) applied to both images."""
        _check_same_shape(he, ihc)
        p = self.sample(he.shape[-2], he.shape[-1]) if params is None else params
        return apply_params(he, p), apply_params(ihc, p)

    def __call__(self, he: torch.Tensor, ihc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.augment(*self.prepare(he, ihc))

    def __repr__(self) -> str:
        return (f"PairedTransform(size={self.size}, crop={self.crop}, flip={self.flip}, rot90={self.rot90}, "
                f"seed={self.seed}, interpolation={self.interpolation!r})")


def _check_same_shape(he: torch.Tensor, ihc: torch.Tensor) -> None:
    if he.shape != ihc.shape:
        raise ValueError(f"H&E and IHC of a pair must have the same shape, got {tuple(he.shape)} and {tuple(ihc.shape)}")


def build_transform(data_cfg: DataConfig, train: bool, seed: int | None = None) -> PairedTransform:
    """The training transform (resize, crop, flips, rotations per ``data_cfg``) when ``train``, else the
    deterministic one (resize only)."""
    size = data_cfg.size or None
    if train:
        return PairedTransform(size=size, crop=data_cfg.crop, flip=data_cfg.flip, rot90=data_cfg.rot90, seed=seed,
                               interpolation=data_cfg.interpolation)
    return PairedTransform(size=size, crop=0, flip=False, rot90=False, seed=seed, interpolation=data_cfg.interpolation)

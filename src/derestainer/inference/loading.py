"""Generators for inference: loading a model file, checkpoint or run folder, and exporting one.

:func:`load_model` is the entry point of every command that runs a generator (``translate``,
``translate-slide``, the benchmark): it finds the generator file
(:func:`~derestainer.core.runs.resolve_generator_file`), picks the device
(:func:`~derestainer.core.device.resolve_device`), and by default builds the fast path
(:func:`~derestainer.inference.optimize.optimize_for_inference`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from derestainer.core.config import Config, replace
from derestainer.core.device import resolve_device
from derestainer.core.fileformat import read_meta
from derestainer.core.guard import refuse_overlap
from derestainer.core.io import file_sha256
from derestainer.core.levels import HER2_LEVELS
from derestainer.core.runs import resolve_generator_file
from derestainer.inference.optimize import optimize_for_inference
from derestainer.inference.precision import Precision
from derestainer.inference.stain_reference import reference_for_export
from derestainer.models.files import load_generator, save_generator


@dataclass
class LoadedModel:
    """A generator ready for inference with what inference needs to know about it.

    Attributes:
        model: the generator in eval mode on ``device``.
        mpp: microns per pixel at the training size.
        size: training size in px.
        multiple: input height/width must be divisible by this.
        level_names: names of the HER2 classes of f_level.
        path: the file it was loaded from; meta: its metadata.
        sha256: SHA-256 of that file's bytes when it was loaded ("" when not computed).
    """

    model: torch.nn.Module
    device: torch.device
    mpp: float
    size: int
    multiple: int
    level_names: tuple[str, ...]
    path: Path
    meta: dict[str, Any]
    sha256: str = ""

    @property
    def step(self) -> int | None:
        """The training step the weights were saved at (checkpoints and exports record it), or None."""
        v = self.meta.get("step")
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    @property
    def training_data(self) -> str | None:
        """The training data's name from the metadata: ``training_data`` if recorded, else the config's
        dataset folder name with its layout and split (``BCI_dataset (bci, split train)``); None if neither."""
        named = self.meta.get("training_data")
        if isinstance(named, str) and named:
            return named
        cfg = self.meta.get("config")
        data = cfg.get("data") if isinstance(cfg, dict) else None
        if not isinstance(data, dict):
            return None
        folder = data.get("root") or data.get("he_dir")
        if not isinstance(folder, str) or not folder:
            return None
        return f"{Path(folder).name} ({data.get('layout', '?')}, split {data.get('train_split', '?')})"


def size_multiple(model: torch.nn.Module, cfg: Config) -> int:
    """Input size multiple of a generator: its ``size_multiple`` attribute, else ``2**cfg.model.n_down``."""
    m = getattr(model, "size_multiple", None)
    return int(m) if m else 2 ** int(cfg.model.n_down)


def load_model(
    checkpoint: str | os.PathLike[str],
    device: str | torch.device = "auto",
    *,
    fast: bool = True,
    precision: Precision = "auto",
) -> LoadedModel:
    """Load a generator for inference from a model file, checkpoint folder or run folder.

    Args:
        fast: run it through :func:`derestainer.inference.optimize.optimize_for_inference`
            (BatchNorm folded into convolutions, channels_last, the faster modulated-convolution form,
            inference mode); outputs equal the plain model's to float rounding.
        precision: ``auto`` (bf16 on CUDA and on CPUs with native bf16, else fp32), ``fp32`` or ``bf16``;
            fixed here for the fast path (``predict`` then accepts ``auto`` or this same value). With
            ``fast=False`` it is not used here: the plain model runs at the precision given to
            ``predict``, whose ``auto`` is bf16 autocast on CUDA (stain separation included) and fp32
            elsewhere (:mod:`.precision`).
    Raises:
        CheckpointError: missing, corrupt, or not a generator (e.g. a classifier file).
        DeviceError: the device is not available.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    path = resolve_generator_file(checkpoint)
    model, cfg, meta = load_generator(path, device=dev)
    if fast:
        model = optimize_for_inference(model, dev, precision=precision, copy_model=False)
    n = int(cfg.model.n_levels)
    names = HER2_LEVELS if n == len(HER2_LEVELS) else tuple(str(k) for k in range(n))
    mpp = float(meta.get("mpp", cfg.data.mpp))
    return LoadedModel(model=model, device=dev, mpp=mpp, size=int(meta.get("size", cfg.data.size)),
                       multiple=size_multiple(model, cfg), level_names=names, path=path, meta=meta,
                       sha256=file_sha256(path))


def export_model(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], *, mpp: float | None = None,
                 stain_reference: str | os.PathLike[str] = "none") -> dict[str, Any]:
    """Write the generator of a run/checkpoint as one exported model file; return its metadata.

    The weights are loaded and checked against the architecture first (a file that does not load
    is never exported). ``mpp`` overrides the training resolution recorded in the config
    (``data.mpp``). Other metadata (step, epoch, a stain reference) is kept; ``exported_from`` names
    the source. ``stain_reference``: a folder of training H&E images, ``"auto"`` (the config's training
    split, where it is on this machine) or ``"none"``: the training stain recorded for
    ``--normalize`` (:func:`~.stain_reference.reference_for_export`; ``"stain_reference"`` in the
    metadata, replacing one the source had).

    Raises:
        CheckpointError: no generator there, or the file is another kind of checkpoint.
        OutputError: ``out`` is the checkpoint's own generator file.
    """
    src = resolve_generator_file(checkpoint)
    refuse_overlap([src], out_files=[out])
    model, cfg, meta = load_generator(src, device="cpu")
    if mpp is not None:
        cfg = replace(cfg, data={"mpp": float(mpp)})
    extra = {k: v for k, v in meta.items() if k not in ("kind", "format", "model", "config", "size", "mpp")}
    extra["exported_from"] = "/".join(src.parts[-3:])
    ref = reference_for_export(cfg, stain_reference)
    if ref is not None:
        extra["stain_reference"] = ref
    save_generator(out, model, cfg, extra=extra)
    return read_meta(out)


__all__ = ["LoadedModel", "export_model", "load_model", "size_multiple"]

"""Generator files: one self-describing safetensors file per generator (the exported-model format)."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import torch

from derestainer.core.config import Config, from_dict, to_dict
from derestainer.core.errors import CheckpointError, ConfigError
from derestainer.core.fileformat import (
    check_finite,
    check_fit,
    expect_kind,
    load_tensors,
    read_header,
    read_meta,
    save_tensors,
    unwrap_model,
)
from derestainer.models.destainer import load_stain_matrix
from derestainer.models.registry import create_generator, list_generators

GENERATOR_FORMAT = 1
#: Block counts of :class:`~derestainer.core.config.ModelConfig`: each block holds at least one tensor,
#: so a file's config may not ask for (many) more blocks than the file has tensors.
BLOCK_COUNTS = ("n_down", "n_head_down", "n_fusion_blocks", "d_layers", "d_scales")
BLOCK_SLACK = 64  # for generators that ignore some of the counts (they keep their defaults)
#: The stain matrix buffer of a DeReStainer generator.
STAIN_BUFFER = "destainer.separation.rgb_from_hed"


def save_generator(path: str | os.PathLike[str], model: torch.nn.Module, cfg: Config, extra: dict[str, Any] | None = None) -> Path:
    """Write a generator as one self-describing safetensors file (the exported-model format).

    The metadata carries ``kind='generator'``, the resolved config, the model name and the training
    resolution (``size`` in px and ``mpp`` in µm/px), so that inference needs nothing else.
    Training checkpoints store their generator in this same format.
    """
    meta = {
        "kind": "generator",
        "format": GENERATOR_FORMAT,
        "model": cfg.model.name,
        "config": to_dict(cfg),
        "size": cfg.data.size,
        "mpp": cfg.data.mpp,
        **(extra or {}),
    }
    return save_tensors(path, unwrap_model(model).state_dict(), meta)


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def generator_config(meta: dict[str, Any], path: str | os.PathLike[str], n_tensors: int) -> Config:
    """The :class:`Config` of a generator file's metadata, every value checked before anything is built.

    ``n_tensors`` (how many tensors the file holds) bounds the block counts: a config asking for far
    more blocks than there are tensors is refused before even an empty model is built for it.

    Raises:
        CheckpointError: another kind of file, a config this version cannot read or with values out
            of range, an unknown model, or a ``size``/``mpp``/``format`` that is not a positive number.
    """
    expect_kind(meta, "generator", path)
    fmt = meta.get("format", GENERATOR_FORMAT)
    if isinstance(fmt, bool) or not isinstance(fmt, int) or not 1 <= fmt <= GENERATOR_FORMAT:
        raise CheckpointError(f"{path}: generator file format {fmt!r}; this version reads format {GENERATOR_FORMAT}")
    raw = meta.get("config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: its metadata holds no config object (got {type(raw).__name__})")
    try:
        cfg: Config = from_dict(raw)
    except (ConfigError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its config does not fit this version of derestainer ({exc})") from None
    mc = cfg.model
    if mc.name not in list_generators():
        raise CheckpointError(f"{path}: model {mc.name!r} is not a generator of this version (available: {', '.join(list_generators())})")
    if meta.get("model", mc.name) != mc.name:
        raise CheckpointError(f"{path}: its metadata names model {meta.get('model')!r} but its config {mc.name!r}")
    for name in BLOCK_COUNTS:
        if getattr(mc, name) > n_tensors + BLOCK_SLACK:
            raise CheckpointError(f"{path}: its config asks for model.{name}={getattr(mc, name)}, but the file holds {n_tensors} tensors")
    size = meta.get("size", cfg.data.size)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise CheckpointError(f"{path}: metadata size={size!r}, expected the training size in px (an integer ≥ 1)")
    mpp = meta.get("mpp", cfg.data.mpp)
    if not _positive_number(mpp):
        raise CheckpointError(f"{path}: metadata mpp={mpp!r}, expected the training resolution in µm/px (a positive number)")
    return cfg


def _build(model_cfg: Any, path: str | os.PathLike[str]) -> torch.nn.Module:
    try:
        return create_generator(model_cfg)
    except (ValueError, TypeError, RuntimeError, OverflowError) as exc:  # the architecture's own checks
        raise CheckpointError(f"{path}: model {model_cfg.name!r} cannot be built from its config ({exc})") from None


def load_generator(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """Load a generator written by :func:`save_generator`: ``(model in eval mode, Config, metadata)``.

    Everything is checked before memory is spent on it: the metadata (:func:`generator_config`),
    then the names, shapes and dtypes of the stored tensors against the model built on the ``meta``
    device (no memory), then the values (finite, a valid stain matrix); only then is the real model
    built and loaded.

    Raises:
        CheckpointError: not a generator file, another architecture, bad metadata, or missing,
            unexpected, mis-shaped, mis-typed or non-finite weights.
    """
    meta = read_meta(path)
    header = read_header(path)
    cfg = generator_config(meta, path, len(header))
    # A custom stain matrix travels inside the weights (a buffer); rebuild with the default so that
    # loading does not need the original matrix file, then let the stored buffer overwrite it.
    model_cfg = dataclasses.replace(cfg.model, stain_matrix="ruifrok")
    with torch.device("meta"):
        skeleton = _build(model_cfg, path)
    check_fit(path, header, skeleton.state_dict(), f"model {cfg.model.name!r}")
    del skeleton
    tensors, _ = load_tensors(path, device="cpu")
    check_finite(path, tensors)
    if STAIN_BUFFER in tensors:
        try:
            load_stain_matrix(tensors[STAIN_BUFFER].double().numpy())
        except ConfigError as exc:
            raise CheckpointError(f"{path}: tensor {STAIN_BUFFER!r}: {exc}") from None
    model = _build(model_cfg, path)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:  # (checked above; kept as a last guard)
        raise CheckpointError(f"{path}: weights do not fit model {cfg.model.name!r} ({str(exc).splitlines()[0]})") from None
    return model.to(device).eval(), cfg, meta

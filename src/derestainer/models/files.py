"""Generator files: one self-describing safetensors file per generator (the exported-model format)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from derestainer.core.config import Config, from_dict, to_dict
from derestainer.core.errors import CheckpointError, ConfigError
from derestainer.core.fileformat import expect_kind, load_tensors, save_tensors, unwrap_model
from derestainer.models.registry import create_generator

GENERATOR_FORMAT = 1


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


def load_generator(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """Load a generator written by :func:`save_generator`: ``(model in eval mode, Config, metadata)``.

    Raises:
        CheckpointError: not a generator file, another architecture, or missing/unexpected weights.
    """
    tensors, meta = load_tensors(path, device="cpu")
    expect_kind(meta, "generator", path)
    try:
        cfg = from_dict(meta["config"])
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: its config does not fit this version of derestainer ({exc})") from exc
    # A custom stain matrix travels inside the weights (a buffer); rebuild with the default so that
    # loading does not need the original matrix file, then let the stored buffer overwrite it.
    model = create_generator(dataclasses.replace(cfg.model, stain_matrix="ruifrok"))
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape for the stored config
        raise CheckpointError(f"{path}: weights do not fit model {cfg.model.name!r} ({str(exc).splitlines()[0]})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit model {cfg.model.name!r} "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    return model.to(device).eval(), cfg, meta

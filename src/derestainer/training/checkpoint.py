"""Plain-data checkpoints: tensors in safetensors, everything else as JSON in its metadata.

Nothing here unpickles: a checkpoint downloaded from anywhere can be inspected and loaded safely.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..io import atomic_path

META_KEY = "derestainer"  # metadata entry holding our JSON


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or belongs to another kind of model."""


def save_tensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` and JSON-able ``meta`` to a safetensors file, atomically."""
    p = Path(path)
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(p) as tmp:
        save_file(flat, str(tmp), metadata={META_KEY: json.dumps(meta)})
    return p


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Only the JSON metadata of a checkpoint (cheap: reads the header)."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint")
    try:
        with safe_open(str(p), framework="pt") as f:
            md = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{p}: not a readable safetensors file ({exc})") from exc
    if META_KEY not in md:
        raise CheckpointError(f"{p}: safetensors file without derestainer metadata (not made by derestainer?)")
    return json.loads(md[META_KEY])


def load_tensors(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read tensors and JSON metadata written by :func:`save_tensors`."""
    meta = read_meta(path)
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint ({exc})") from exc
    return tensors, meta


def expect_kind(meta: dict[str, Any], kind: str, path: str | os.PathLike[str]) -> None:
    """Raise a clear error when a checkpoint is of another kind (e.g. a classifier given as a generator)."""
    got = meta.get("kind")
    if got != kind:
        raise CheckpointError(f"{path}: this is a {got or 'unknown'} checkpoint, expected a {kind} checkpoint")


GENERATOR_FORMAT = 1


def save_generator(path: str | os.PathLike[str], model: torch.nn.Module, cfg: Any, extra: dict[str, Any] | None = None) -> Path:
    """Write a generator as one self-describing safetensors file (the exported-model format).

    The metadata carries ``kind='generator'``, the resolved config, the model name and the training
    resolution (``size`` in px and ``mpp`` in µm/px), so that inference needs nothing else.
    Training checkpoints store their generator in this same format.
    """
    from ..config import to_dict

    meta = {
        "kind": "generator",
        "format": GENERATOR_FORMAT,
        "model": cfg.model.name,
        "config": to_dict(cfg),
        "size": cfg.data.size,
        "mpp": cfg.data.mpp,
        **(extra or {}),
    }
    module = getattr(model, "module", model)  # unwrap DDP / compile wrappers
    module = getattr(module, "_orig_mod", module)
    return save_tensors(path, module.state_dict(), meta)


def load_generator(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Load a generator written by :func:`save_generator`: ``(model in eval mode, Config, metadata)``.

    Raises:
        CheckpointError: not a generator file, another architecture, or missing/unexpected weights.
    """
    from ..config import ConfigError, from_dict
    from ..models.registry import create_generator

    tensors, meta = load_tensors(path, device="cpu")
    expect_kind(meta, "generator", path)
    try:
        cfg = from_dict(meta["config"])
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: its config does not fit this version of derestainer ({exc})") from exc
    # A custom stain matrix travels inside the weights (a buffer); rebuild with the default so that
    # loading does not need the original matrix file, then let the stored buffer overwrite it.
    import dataclasses

    model = create_generator(dataclasses.replace(cfg.model, stain_matrix="ruifrok"))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit model {cfg.model.name!r} "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    return model.to(device).eval(), cfg, meta

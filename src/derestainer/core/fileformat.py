"""The project's file format: tensors in safetensors, everything else as JSON in its metadata.

Every model, classifier, optimizer and exported file of derestainer is such a file; its ``kind``
(``generator``, ``classifier``, ``discriminator``, ``optimizer``) says what it holds.

Nothing here unpickles: a checkpoint downloaded from anywhere can be inspected and loaded safely.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from derestainer.core.errors import CheckpointError
from derestainer.core.io import atomic_path

META_KEY = "derestainer"  # metadata entry holding our JSON


def save_tensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` and JSON-able ``meta`` to a safetensors file, atomically."""
    p = Path(path)
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(p) as tmp:
        save_file(flat, str(tmp), metadata={META_KEY: json.dumps(meta)})
    return p


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Only the JSON metadata of a checkpoint (cheap: reads the header)."""
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




def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    module = getattr(model, "module", model)
    return getattr(module, "_orig_mod", module)

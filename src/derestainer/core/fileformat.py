"""The project's file format: tensors in safetensors, everything else as JSON in its metadata.

Every model, classifier, optimizer and exported file of derestainer is such a file; its ``kind``
(``generator``, ``classifier``, ``discriminator``, ``optimizer``) says what it holds.

Nothing here unpickles: a checkpoint downloaded from anywhere can be inspected and loaded safely.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from derestainer.core.errors import CheckpointError, OutputError
from derestainer.core.io import atomic_path

META_KEY = "derestainer"  # metadata entry holding our JSON

#: safetensors dtype codes a derestainer file may hold, and their torch dtypes; anything else
#: (float8, complex, wide unsigned integers) is refused as "not made by derestainer".
TENSOR_DTYPES: dict[str, torch.dtype] = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8, "BOOL": torch.bool,
}
#: ``(shape, dtype)`` of each tensor of a file, as its header declares them.
Header = dict[str, tuple[tuple[int, ...], torch.dtype]]


def save_tensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` and JSON-able ``meta`` to a safetensors file, atomically."""
    p = Path(path)
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(p) as tmp:
        try:
            save_file(flat, str(tmp), metadata={META_KEY: json.dumps(meta)})
        except SafetensorError as exc:  # safetensors reports a full disk or a read-only folder this way
            raise OutputError(f"{p}: cannot write ({' '.join(str(exc).split())})") from None
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
    try:
        meta = json.loads(md[META_KEY])
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{p}: its derestainer metadata is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{p}: its derestainer metadata is a JSON {type(meta).__name__}, expected an object")
    return meta


def read_header(path: str | os.PathLike[str]) -> Header:
    """Name → ``(shape, dtype)`` of every tensor of a safetensors file, from its header (reads no tensor data).

    Raises:
        CheckpointError: unreadable file, or a tensor of a dtype derestainer never writes.
    """
    p = Path(path)
    out: Header = {}
    try:
        with safe_open(str(p), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
                sl = f.get_slice(name)
                code = sl.get_dtype()
                if code not in TENSOR_DTYPES:
                    raise CheckpointError(f"{p}: tensor {name!r} has dtype {code}, which derestainer never writes")
                out[name] = (tuple(int(n) for n in sl.get_shape()), TENSOR_DTYPES[code])
    except (SafetensorError, OSError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{p}: not a readable safetensors file ({exc})") from exc
    return out


def check_fit(path: str | os.PathLike[str], header: Header, expected: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise unless ``header`` (:func:`read_header`) holds exactly the names, shapes and dtypes of ``expected``.

    ``expected`` is a state dict, typically of a model built on the ``meta`` device (no memory):
    checking a file against it first means that nothing is allocated for a file that does not fit.

    Raises:
        CheckpointError: ``"<path>: weights do not fit <what> (...)"`` naming the first offending tensor.
    """
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit {what} (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name, ref in expected.items():
        shape, dtype = header[name]
        if shape != tuple(ref.shape):
            raise CheckpointError(
                f"{path}: weights do not fit {what} (tensor {name!r} has shape {shape}, expected {tuple(ref.shape)})")
        if dtype != ref.dtype:
            raise CheckpointError(
                f"{path}: weights do not fit {what} (tensor {name!r} is {dtype}, expected {ref.dtype})")


def check_finite(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`CheckpointError` naming the first floating-point tensor with a NaN or an infinity."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: tensor {name!r} holds non-finite values (NaN or infinity)")


def load_tensors(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read tensors and JSON metadata written by :func:`save_tensors`.

    Raises:
        CheckpointError: unreadable file, metadata that is not a JSON object, or a tensor of a dtype
            derestainer never writes (:data:`TENSOR_DTYPES`).
    """
    meta = read_meta(path)
    read_header(path)  # refuses unexpected dtypes before any tensor is read
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint ({exc})") from exc
    return tensors, meta


def expect_kind(meta: dict[str, Any], kind: str, path: str | os.PathLike[str]) -> None:
    """Raise a clear error when a checkpoint is of another kind (e.g. a classifier given as a generator)."""
    got = meta.get("kind")
    if got != kind:
        name = got if isinstance(got, str) and got.isidentifier() else "unknown"
        raise CheckpointError(f"{path}: this is a {name} checkpoint, expected a {kind} checkpoint")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    module = getattr(model, "module", model)
    return getattr(module, "_orig_mod", module)

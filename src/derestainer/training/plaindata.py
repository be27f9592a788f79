"""Training state that is not a model, as plain data: global RNG states as JSON, and nested
optimizer ``state_dict``s as safetensors tensors plus a JSON structure. Nothing is pickled."""

from __future__ import annotations

import base64
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from derestainer.core.errors import CheckpointError
from derestainer.core.fileformat import expect_kind, load_tensors, save_tensors

# --------------------------------------------------------------------------------------------------
# RNG states as JSON


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """The global RNG states of Python, NumPy, torch (CPU) and every CUDA device, as JSON-able data."""
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [kind, np.asarray(keys, dtype=np.uint32).tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only where the device count matches)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(_unb64(state["torch"]))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])


# --------------------------------------------------------------------------------------------------
# Nested state (optimizer state_dicts) ↔ safetensors tensors + JSON structure


def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts, lists, tuples, scalars, tensors) into tensors and a JSON structure.

    Tensors are replaced by ``{"__tensor__": key}`` and collected under ``key`` ("t0", "t1", …);
    tuples become ``{"__tuple__": [...]}`` so that they come back as tuples; dict keys that are
    ints (optimizer ``state`` is keyed by parameter index) become ``{"__int_keys__": [[k, v], …]}``.

    Returns:
        ``(tensors, structure)`` where ``structure`` is JSON-able and ``tensors`` can be saved with
        :func:`~derestainer.core.fileformat.save_tensors`. Inverse: :func:`unflatten_state`.
    Raises:
        TypeError: on a value that is neither a tensor nor plain data (never pickled instead).
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = x.detach()
            return {"__tensor__": key}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                return {k: enc(v) for k, v in x.items()}
            if all(isinstance(k, int) and not isinstance(k, bool) for k in x):
                return {"__int_keys__": [[k, enc(v)] for k, v in x.items()]}
            raise TypeError(f"cannot store a dict with keys of mixed or non-str/int types: {list(x)[:5]}")
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store a {type(x).__name__} as plain data")

    return tensors, enc(obj)


def unflatten_state(tensors: dict[str, torch.Tensor], structure: Any) -> Any:
    """Inverse of :func:`flatten_state`."""

    def dec(x: Any) -> Any:
        if isinstance(x, dict):
            if set(x) == {"__tensor__"}:
                try:
                    return tensors[x["__tensor__"]]
                except KeyError:
                    raise CheckpointError(f"tensor {x['__tensor__']!r} named in the structure is missing") from None
            if set(x) == {"__tuple__"}:
                return tuple(dec(v) for v in x["__tuple__"])
            if set(x) == {"__int_keys__"}:
                return {int(k): dec(v) for k, v in x["__int_keys__"]}
            return {k: dec(v) for k, v in x.items()}
        if isinstance(x, list):
            return [dec(v) for v in x]
        return x

    return dec(structure)


def save_optimizer(path: str | os.PathLike[str], optimizer: torch.optim.Optimizer, extra: dict[str, Any] | None = None) -> Path:
    """Write ``optimizer.state_dict()`` as safetensors (tensors) + JSON metadata (everything else)."""
    tensors, structure = flatten_state(optimizer.state_dict())
    meta = {"kind": "optimizer", "class": type(optimizer).__name__, "structure": structure, **(extra or {})}
    return save_tensors(path, tensors, meta)


def load_optimizer(path: str | os.PathLike[str], optimizer: torch.optim.Optimizer) -> None:
    """Load a state written by :func:`save_optimizer` into ``optimizer`` (tensors moved to its params' device)."""
    tensors, meta = load_tensors(path, device="cpu")
    expect_kind(meta, "optimizer", path)
    if meta.get("class") != type(optimizer).__name__:
        raise CheckpointError(f"{path}: optimizer state of a {meta.get('class')}, expected {type(optimizer).__name__}")
    sd = unflatten_state(tensors, meta["structure"])
    ours = optimizer.state_dict()["param_groups"]
    theirs = sd.get("param_groups", [])
    if [len(g["params"]) for g in ours] != [len(g["params"]) for g in theirs]:
        raise CheckpointError(f"{path}: optimizer state is for another model (parameter groups differ)")
    try:
        optimizer.load_state_dict(sd)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: optimizer state does not fit this model ({exc})") from exc

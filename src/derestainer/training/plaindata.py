"""Training state that is not a model, as plain data: global RNG states as JSON, and nested
optimizer ``state_dict``s as safetensors tensors plus a JSON structure. Nothing is pickled."""

from __future__ import annotations

import base64
import binascii
import math
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
    if not isinstance(s, str):
        raise TypeError(f"expected a base64 string, got {type(s).__name__}")
    raw = base64.b64decode(s, validate=True)
    if not raw:
        raise ValueError("empty state")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


MT_N = 624  # words of a Mersenne Twister state (Python's random and NumPy's legacy RandomState)


def _is_int(x: Any, lo: int, hi: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def _python_state(py: Any) -> tuple[Any, ...]:
    if not isinstance(py, list) or len(py) != 3 or not isinstance(py[1], list):
        raise ValueError("python: expected [version, [625 integers], gauss]")
    gauss = py[2]
    if gauss is not None and (isinstance(gauss, bool) or not isinstance(gauss, (int, float))):
        raise ValueError(f"python: gauss must be null or a number, got {type(gauss).__name__}")
    if not all(_is_int(x, 0, 2**32 - 1) for x in py[1]):
        raise ValueError("python: the internal state must be unsigned 32-bit integers")
    state = (py[0], tuple(py[1]), gauss)
    random.Random().setstate(state)  # a private generator: checks version and length, restores nothing
    return state


def _numpy_state(st: Any) -> tuple[Any, ...]:
    if not isinstance(st, list) or len(st) != 5:
        raise ValueError("numpy: expected [kind, [624 keys], pos, has_gauss, cached_gaussian]")
    kind, keys, pos, has_gauss, cached = st
    if kind != "MT19937" or not isinstance(keys, list) or len(keys) != MT_N or not all(_is_int(k, 0, 2**32 - 1) for k in keys):
        raise ValueError(f"numpy: expected MT19937 with {MT_N} unsigned 32-bit keys")
    if not _is_int(pos, 0, MT_N) or not _is_int(has_gauss, 0, 1):
        raise ValueError(f"numpy: pos must be 0..{MT_N} and has_gauss 0 or 1, got {pos!r}, {has_gauss!r}")
    if isinstance(cached, bool) or not isinstance(cached, (int, float)) or not math.isfinite(cached):
        raise ValueError(f"numpy: cached_gaussian must be a finite number, got {cached!r}")
    state = (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, float(cached))
    np.random.RandomState().set_state(state)
    return state


def check_rng_state(state: Any, where: str) -> None:
    """Raise ``CheckpointError("<where>: …")`` unless ``state`` is what :func:`rng_state` returns.

    Every part is tried on a private generator (Python, NumPy, torch CPU), so nothing is restored.
    """
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: RNG state is a {type(state).__name__}, expected an object")
    missing = sorted({"python", "numpy", "torch"} - set(state))
    if missing:
        raise CheckpointError(f"{where}: RNG state without {', '.join(missing)}")
    try:
        _python_state(state["python"])
        _numpy_state(state["numpy"])
        torch.Generator().set_state(_unb64(state["torch"]))
        cuda = state.get("cuda") or []
        if not isinstance(cuda, list):
            raise ValueError("cuda: expected a list of states")
        for s in cuda:
            _unb64(s)
    except (TypeError, ValueError, RuntimeError, OverflowError, binascii.Error) as exc:
        raise CheckpointError(f"{where}: malformed RNG state ({exc})") from None


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


def set_rng_state(state: dict[str, Any], where: str = "RNG state") -> None:
    """Restore what :func:`rng_state` returned (CUDA states only where the device count matches).

    Everything is checked first (:func:`check_rng_state`): a malformed state changes no generator.

    Raises:
        CheckpointError: ``"<where>: …"``, a malformed state.
    """
    check_rng_state(state, where)
    random.setstate(_python_state(state["python"]))
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.set_rng_state(_unb64(state["torch"]))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        try:
            torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])
        except RuntimeError as exc:
            raise CheckpointError(f"{where}: malformed CUDA RNG state ({exc})") from None


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


def _same_kind(ref: Any, val: Any) -> bool:
    """Whether an optimizer setting ``val`` from a file can stand where this optimizer has ``ref``."""
    if isinstance(ref, bool) or ref is None:
        return isinstance(val, bool) or val is None
    if isinstance(ref, (int, float)):
        return isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val)
    if isinstance(ref, (tuple, list)):
        return isinstance(val, (tuple, list)) and len(val) == len(ref) and all(_same_kind(a, b) for a, b in zip(ref, val))
    if isinstance(ref, str):
        return isinstance(val, str)
    return True  # anything else (tensors): left to torch


def _check_groups(path: str | os.PathLike[str], ours: list[dict[str, Any]], theirs: Any) -> list[Any]:
    """The parameter ids of ``theirs`` (a file's ``param_groups``) in order, after checking them against ``ours``."""
    if not isinstance(theirs, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in theirs):
        raise CheckpointError(f"{path}: optimizer state without a list of parameter groups")
    if [len(g["params"]) for g in ours] != [len(g["params"]) for g in theirs]:
        raise CheckpointError(f"{path}: optimizer state is for another model (parameter groups differ)")
    for mine, other in zip(ours, theirs):
        for key, ref in mine.items():
            if key != "params" and key in other and not _same_kind(ref, other[key]):
                raise CheckpointError(f"{path}: optimizer setting {key}={other[key]!r} does not fit (expected a value like {ref!r})")
    ids = [i for g in theirs for i in g["params"]]
    if not all(_is_int(i, 0, 2**62) for i in ids) or len(set(ids)) != len(ids):
        raise CheckpointError(f"{path}: optimizer state with malformed parameter ids")
    return ids


def check_optimizer_state(path: str | os.PathLike[str], sd: Any, optimizer: torch.optim.Optimizer) -> None:
    """Raise :class:`CheckpointError` unless ``sd`` (read from ``path``) fits ``optimizer`` exactly.

    ``Optimizer.load_state_dict`` checks only the group sizes; a moment buffer of another shape, a
    non-float one or a setting of another type would only fail at the first step, mid-training.
    """
    if not isinstance(sd, dict) or not isinstance(sd.get("state"), dict):
        raise CheckpointError(f"{path}: not an optimizer state_dict (expected state and param_groups)")
    ids = _check_groups(path, optimizer.state_dict()["param_groups"], sd.get("param_groups"))
    params = dict(zip(ids, (p for g in optimizer.param_groups for p in g["params"])))
    for pid, st in sd["state"].items():
        if pid not in params or not isinstance(st, dict):
            raise CheckpointError(f"{path}: optimizer state for an unknown parameter {pid!r}")
        shape = tuple(params[pid].shape)
        for name, v in st.items():
            if not isinstance(v, torch.Tensor):
                if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                    raise CheckpointError(f"{path}: optimizer state {name!r} of parameter {pid} is {v!r}, expected a number")
                continue
            if not v.is_floating_point() or not bool(torch.isfinite(v).all()):
                raise CheckpointError(f"{path}: optimizer state {name!r} of parameter {pid} is not finite floating point ({v.dtype})")
            if v.dim() > 0 and tuple(v.shape) != shape:
                raise CheckpointError(
                    f"{path}: optimizer state {name!r} of parameter {pid} has shape {tuple(v.shape)}, the parameter {shape}")


def load_optimizer(path: str | os.PathLike[str], optimizer: torch.optim.Optimizer) -> None:
    """Load a state written by :func:`save_optimizer` into ``optimizer`` (tensors moved to its params' device).

    Raises:
        CheckpointError: another kind of file or optimizer, or a state that does not fit (checked
            before the optimizer is touched: :func:`check_optimizer_state`).
    """
    tensors, meta = load_tensors(path, device="cpu")
    expect_kind(meta, "optimizer", path)
    if meta.get("class") != type(optimizer).__name__:
        raise CheckpointError(f"{path}: optimizer state of a {meta.get('class')}, expected {type(optimizer).__name__}")
    try:
        sd = unflatten_state(tensors, meta.get("structure"))
    except (TypeError, ValueError, KeyError, RecursionError) as exc:  # CheckpointError is a ValueError
        raise CheckpointError(f"{path}: malformed optimizer state structure ({exc})") from None
    check_optimizer_state(path, sd, optimizer)
    try:
        optimizer.load_state_dict(sd)
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: optimizer state does not fit this model ({exc})") from exc

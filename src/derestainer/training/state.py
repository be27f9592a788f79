"""Training state as plain data, and run checkpoints as folders of plain-data files.

A run checkpoint is a folder ``<run>/checkpoints/step-0000100/`` holding

* ``generator.safetensors``  — the exported-model format (:func:`~.checkpoint.save_generator`), so that a
  checkpoint's generator can be given to ``derestainer translate`` as it is;
* ``discriminator.safetensors`` — ``kind='discriminator'``;
* ``optim_g.safetensors`` / ``optim_d.safetensors`` — optimizer state tensors, with the rest of the
  optimizer ``state_dict`` (hyper-parameters, structure) as JSON in the metadata (:func:`flatten_state`);
* ``state.json`` — :class:`TrainState`: step, epoch, position in the epoch, RNG states, best metric,
  validation history, consecutive bad steps, the resolved config.

Nothing is ever unpickled. A checkpoint is written into a hidden temporary folder beside its final
place, every file is flushed to disk, the folder is renamed into place, and only then is the
``<run>/latest`` pointer (a one-line text file) replaced atomically. A crash at any moment therefore
leaves either the previous checkpoint set or the new one, never a half-written checkpoint under a
final name; stale temporary folders are removed by :func:`clean_incomplete`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import write_json, write_text
from .checkpoint import (
    CheckpointError,
    expect_kind,
    load_tensors,
    read_meta,
    save_generator,
    save_tensors,
)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FORMAT = 1
_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"


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
        :func:`~.checkpoint.save_tensors`. Inverse: :func:`unflatten_state`.
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


# --------------------------------------------------------------------------------------------------
# The training state


@dataclass
class TrainState:
    """Where training stands; saved as ``state.json`` in every checkpoint.

    Attributes:
        step: optimizer steps done.
        epoch: current epoch (the sampler's permutation is seeded by ``(seed, epoch)``).
        batch_in_epoch: micro-batches of ``epoch`` already consumed (skipped on resume).
        world_size: number of ranks the data order was made for.
        best_value / best_step: best validation value of ``train.best_metric`` and its step (None: none yet).
        bad_streak: consecutive steps with a non-finite loss at the time of saving.
        skipped_steps: total steps skipped for non-finite losses.
        history: validation results, one dict per validation (step, epoch, metrics).
        rng: global RNG states (:func:`rng_state`), one per rank in rank order (checkpoints written
            before per-rank states hold a single dict: rank 0's).
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    world_size: int = 1
    best_value: float | None = None
    best_step: int | None = None
    bad_streak: int = 0
    skipped_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    rng: dict[str, Any] | list[dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------------------------------
# Run checkpoints (folders)


def checkpoint_dir(run_dir: str | os.PathLike[str], step: int) -> Path:
    """``<run>/checkpoints/step-0000100``."""
    return Path(run_dir) / CHECKPOINTS / f"{_PREFIX}{step:07d}"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    *,
    generator: torch.nn.Module,
    discriminator: torch.nn.Module | None,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer | None,
    cfg: Any,
    state: TrainState,
) -> Path:
    """Write a complete checkpoint for ``state.step`` atomically and point ``<run>/latest`` at it.

    Returns:
        The checkpoint folder.
    """
    from ..config import to_dict

    final = checkpoint_dir(run_dir, state.step)
    old: Path | None = None
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{final.name}-", dir=parent))
    try:
        extra = {"step": state.step, "epoch": state.epoch}
        save_generator(tmp / "generator.safetensors", generator, cfg, extra=extra)
        if discriminator is not None:
            d = getattr(discriminator, "module", discriminator)
            save_tensors(tmp / "discriminator.safetensors", d.state_dict(),
                         {"kind": "discriminator", "model": cfg.model.name, "config": to_dict(cfg), **extra})
        save_optimizer(tmp / "optim_g.safetensors", opt_g, extra)
        if opt_d is not None:
            save_optimizer(tmp / "optim_d.safetensors", opt_d, extra)
        write_json(tmp / "state.json", {"kind": "train_state", "format": STATE_FORMAT, "config": to_dict(cfg),
                                        **_json_safe(state.to_dict())})
        _fsync_dir(tmp)
        if final.exists():  # a checkpoint of the same step from an earlier, interrupted attempt
            # moved aside under a temporary name (which clean_incomplete removes should we crash before
            # deleting it) rather than deleted first: the step's folder is missing only between two
            # renames, and an error there puts the earlier one back
            old = parent / f"{_TMP_PREFIX}old-{final.name}-{os.getpid()}-{os.urandom(4).hex()}"
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not final.exists():  # put the earlier one back
            os.replace(old, final)
        raise
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    write_text(Path(run_dir) / LATEST, f"{CHECKPOINTS}/{final.name}\n")
    return final


def _json_safe(x: Any) -> Any:
    # JSON has no NaN/inf in the strict sense; keep state.json readable by any parser.
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    out = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / "state.json").is_file()]
    return sorted(out, key=lambda p: int(p.name[len(_PREFIX):]))


def clean_incomplete(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary folders left by a checkpoint write that was interrupted; return them."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith(_TMP_PREFIX)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint folder from a checkpoint folder, or a run folder (via its ``latest`` pointer).

    Raises:
        CheckpointError: nothing to resume from.
    """
    p = Path(path)
    if (p / "state.json").is_file():
        return p
    pointer = p / LATEST
    if pointer.is_file():
        target = p / pointer.read_text().strip()
        if (target / "state.json").is_file():
            return target
    found = list_checkpoints(p)  # pointer missing or stale (e.g. its folder was deleted by hand)
    if found:
        return found[-1]
    raise CheckpointError(f"{p}: no checkpoint to resume from (expected a run folder with '{LATEST}' or a checkpoint folder)")


def read_state(ckpt: str | os.PathLike[str]) -> tuple[TrainState, dict[str, Any]]:
    """``(TrainState, config as plain data)`` of a checkpoint folder."""
    p = Path(ckpt) / "state.json"
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{p}: unreadable training state ({exc})") from exc
    if data.get("kind") != "train_state" or "config" not in data:
        raise CheckpointError(f"{p}: not a derestainer training state")
    return TrainState.from_dict(data), data["config"]


def check_compatible(ckpt: str | os.PathLike[str], cfg: Any,
                     theirs: dict[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
    """Raise :class:`CheckpointError` if the checkpoint was made for another model than ``cfg.model``.

    Keys that the checkpoint's config lacks (added to the schema after it was written) compare as
    their defaults.

    Args:
        theirs: the checkpoint's config when the caller has already read it (:func:`read_state`).
    Returns:
        The other config differences ``{'section.key': (checkpoint value, current value)}`` (allowed:
        e.g. more steps, another learning rate) so that the caller can report them.
    """
    from ..config import ConfigError, from_dict, to_dict

    if theirs is None:
        _, theirs = read_state(ckpt)
    try:
        theirs = to_dict(from_dict(theirs))
    except ConfigError:  # keys this version no longer knows: compare what is there
        pass
    ours = to_dict(cfg)
    diffs: dict[str, tuple[Any, Any]] = {}
    for section in ours:
        for key, val in ours[section].items():
            old = theirs.get(section, {}).get(key, "<absent>")
            if old != val:
                diffs[f"{section}.{key}"] = (old, val)
    model_diffs = {k: v for k, v in diffs.items() if k.startswith("model.")}
    if model_diffs:
        detail = ", ".join(f"{k}: {a!r} in the checkpoint vs {b!r} now" for k, (a, b) in sorted(model_diffs.items()))
        raise CheckpointError(f"{ckpt}: checkpoint is for another model ({detail}); resume with its config or start a new run")
    return diffs


def load_checkpoint(
    ckpt: str | os.PathLike[str],
    *,
    generator: torch.nn.Module,
    discriminator: torch.nn.Module | None,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer | None,
    cfg: Any,
) -> TrainState:
    """Load a checkpoint folder into the given (unwrapped) modules and optimizers; return its state.

    Raises:
        CheckpointError: missing/corrupt files, another model, or weights that do not fit.
    """
    p = Path(ckpt)
    state, theirs = read_state(p)
    check_compatible(p, cfg, theirs)
    _load_module(p / "generator.safetensors", generator, "generator")
    if discriminator is not None:
        _load_module(p / "discriminator.safetensors", discriminator, "discriminator")
    load_optimizer(p / "optim_g.safetensors", opt_g)
    if opt_d is not None:
        load_optimizer(p / "optim_d.safetensors", opt_d)
    return state


def _load_module(path: Path, module: torch.nn.Module, kind: str) -> None:
    tensors, meta = load_tensors(path, device="cpu")
    expect_kind(meta, kind, path)
    try:
        missing, unexpected = module.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise CheckpointError(f"{path}: {kind} weights do not fit this model ({exc})") from exc
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: {kind} weights do not fit this model (missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )


def verify_checkpoint(ckpt: str | os.PathLike[str]) -> dict[str, Any]:
    """Read every file of a checkpoint folder (headers and tensors); raise :class:`CheckpointError` if any is bad.

    Returns:
        ``{'step': ..., 'files': [...]}``.
    """
    p = Path(ckpt)
    state, _ = read_state(p)
    files = []
    for name, kind in (("generator.safetensors", "generator"), ("discriminator.safetensors", "discriminator"),
                       ("optim_g.safetensors", "optimizer"), ("optim_d.safetensors", "optimizer")):
        f = p / name
        if not f.exists() and name in ("discriminator.safetensors", "optim_d.safetensors"):
            continue
        expect_kind(read_meta(f), kind, f)
        load_tensors(f)
        files.append(name)
    return {"step": state.step, "files": files}


def prune_checkpoints(run_dir: str | os.PathLike[str], keep_last: int, keep: set[str] | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints, sparing the folder names in ``keep`` (e.g. the best).

    The folder the ``latest`` pointer names is never deleted. Returns the deleted folders.
    """
    ckpts = list_checkpoints(run_dir)
    spare = set(keep or ())
    pointer = Path(run_dir) / LATEST
    if pointer.is_file():
        spare.add(Path(pointer.read_text().strip()).name)
    newest = {p.name for p in ckpts[-keep_last:]} if keep_last > 0 else set()
    gone = [p for p in ckpts if p.name not in newest and p.name not in spare]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone

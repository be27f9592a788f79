"""The training state, and run checkpoints as folders of plain-data files (save, load, verify, prune).

A run checkpoint is a folder ``<run>/checkpoints/step-0000100/`` holding

* ``generator.safetensors``  — the exported-model format (:func:`~derestainer.models.files.save_generator`),
  so that a checkpoint's generator can be given to ``derestainer translate`` as it is;
* ``discriminator.safetensors`` — ``kind='discriminator'``;
* ``optim_g.safetensors`` / ``optim_d.safetensors`` — optimizer state tensors, with the rest of the
  optimizer ``state_dict`` (hyper-parameters, structure) as JSON in the metadata
  (:func:`~derestainer.training.plaindata.flatten_state`);
* ``state.json`` — :class:`TrainState`: step, epoch, position in the epoch, RNG states, best metric,
  validation history, consecutive bad steps, the resolved config.

Nothing is ever unpickled. A checkpoint is written into a hidden temporary folder beside its final
place, every file is flushed to disk, the folder is renamed into place, and only then is the
``<run>/latest`` pointer (a one-line text file) replaced atomically. A crash at any moment therefore
leaves either the previous checkpoint set or the new one, never a half-written checkpoint under a
final name; stale temporary folders are removed by :func:`derestainer.core.runs.clean_incomplete`.
The run-folder layout itself (``checkpoints/``, ``latest``, finding a checkpoint) is
:mod:`derestainer.core.runs`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from derestainer.core.config import from_dict, to_dict
from derestainer.core.errors import CheckpointError, ConfigError
from derestainer.core.fileformat import check_fit, expect_kind, load_tensors, read_header, read_meta, save_tensors
from derestainer.core.io import jsonable, write_json, write_text
from derestainer.core.runs import (
    CHECKPOINTS,
    EMA_FILE,
    LATEST,
    STATE_FILE,
    TMP_PREFIX,
    checkpoint_dir,
    list_checkpoints,
    read_pointer,
)
from derestainer.models.files import save_generator
from derestainer.training.plaindata import check_rng_state, load_optimizer, save_optimizer

STATE_FORMAT = 1


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
        rng: global RNG states (:func:`~derestainer.training.plaindata.rng_state`), one per rank in rank order (checkpoints written
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


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _new_tmp_dir(parent: Path, prefix: str) -> Path:
    """A new hidden folder ``<parent>/<prefix><random>``, created like any other folder (the umask
    applies, unlike ``tempfile.mkdtemp``'s mode 0700, so the checkpoint gets the run's permissions)."""
    for _ in range(100):
        tmp = parent / f"{prefix}{os.urandom(6).hex()}"
        try:
            os.mkdir(tmp, 0o777)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{parent}: no free temporary folder name")


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    *,
    generator: torch.nn.Module,
    discriminator: torch.nn.Module | None,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer | None,
    cfg: Any,
    state: TrainState,
    ema: torch.nn.Module | None = None,
) -> Path:
    """Write a complete checkpoint for ``state.step`` atomically and point ``<run>/latest`` at it.

    Returns:
        The checkpoint folder.
    """
    final = checkpoint_dir(run_dir, state.step)
    old: Path | None = None
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_tmp_dir(parent, f"{TMP_PREFIX}{final.name}-")
    try:
        extra = {"step": state.step, "epoch": state.epoch}
        save_generator(tmp / "generator.safetensors", generator, cfg, extra=extra)
        if ema is not None:
            save_generator(tmp / EMA_FILE, ema, cfg, extra={**extra, "ema": True})
        if discriminator is not None:
            d = getattr(discriminator, "module", discriminator)
            save_tensors(tmp / "discriminator.safetensors", d.state_dict(),
                         {"kind": "discriminator", "model": cfg.model.name, "config": to_dict(cfg), **extra})
        save_optimizer(tmp / "optim_g.safetensors", opt_g, extra)
        if opt_d is not None:
            save_optimizer(tmp / "optim_d.safetensors", opt_d, extra)
        write_json(tmp / "state.json", {"kind": "train_state", "format": STATE_FORMAT, "config": to_dict(cfg),
                                        **jsonable(state.to_dict(), "null")})
        _fsync_dir(tmp)
        if final.exists():  # a checkpoint of the same step from an earlier, interrupted attempt
            # moved aside under a temporary name (which clean_incomplete removes should we crash before
            # deleting it) rather than deleted first: the step's folder is missing only between two
            # renames, and an error there puts the earlier one back
            old = parent / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}-{os.urandom(4).hex()}"
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




#: Fields of ``state.json`` that are counts (integers ≥ 0; ``world_size`` ≥ 1).
_STATE_COUNTS = ("step", "epoch", "batch_in_epoch", "world_size", "bad_streak", "skipped_steps")


def _is_count(x: Any, lo: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= lo


def check_state(data: Any, p: Path) -> None:
    """Raise ``CheckpointError("<p>: …")`` unless ``data`` (a parsed ``state.json``) is a training state
    that resuming can use: counts, best value/step, history, RNG states (:func:`check_rng_state`), config."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{p}: the training state is a JSON {type(data).__name__}, expected an object")
    if data.get("kind") != "train_state" or "config" not in data:
        raise CheckpointError(f"{p}: not a derestainer training state")
    cfg = data["config"]
    if not isinstance(cfg, dict) or not all(isinstance(v, dict) for v in cfg.values()):
        raise CheckpointError(f"{p}: its config is not an object of sections")
    for name in _STATE_COUNTS:
        if name in data and not _is_count(data[name], 1 if name == "world_size" else 0):
            raise CheckpointError(f"{p}: {name}={data[name]!r}, expected an integer ≥ {1 if name == 'world_size' else 0}")
    best = data.get("best_value")
    if best is not None and (isinstance(best, bool) or not isinstance(best, (int, float)) or math.isnan(best)):
        raise CheckpointError(f"{p}: best_value={best!r}, expected a number or null")
    if data.get("best_step") is not None and not _is_count(data["best_step"]):
        raise CheckpointError(f"{p}: best_step={data['best_step']!r}, expected an integer ≥ 0 or null")
    history = data.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise CheckpointError(f"{p}: history is not a list of objects")
    rng = data.get("rng", {})
    for i, r in enumerate(rng if isinstance(rng, list) else [rng]):
        if r != {}:  # {}: no RNG state saved
            check_rng_state(r, f"{p}: rng" + (f"[{i}]" if isinstance(rng, list) else ""))


def read_state(ckpt: str | os.PathLike[str]) -> tuple[TrainState, dict[str, Any]]:
    """``(TrainState, config as plain data)`` of a checkpoint folder, every field checked (:func:`check_state`).

    Raises:
        CheckpointError: ``state.json`` is missing, not JSON, or not a usable training state.
    """
    p = Path(ckpt) / STATE_FILE
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{p}: unreadable training state ({str(exc)[:200]})") from None
    check_state(data, p)
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
    if theirs is None:
        _, theirs = read_state(ckpt)
    with contextlib.suppress(ConfigError):  # keys this version no longer knows: compare what is there
        theirs = to_dict(from_dict(theirs))
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
    ema: torch.nn.Module | None = None,
) -> TrainState:
    """Load a checkpoint folder into the given (unwrapped) modules and optimizers; return its state.

    Raises:
        CheckpointError: missing/corrupt files, another model, or weights that do not fit.
    """
    p = Path(ckpt)
    state, theirs = read_state(p)
    check_compatible(p, cfg, theirs)
    _load_module(p / "generator.safetensors", generator, "generator")
    if ema is not None:
        if (p / EMA_FILE).is_file():
            _load_module(p / EMA_FILE, ema, "generator")
        elif float((theirs.get("train") or {}).get("ema") or 0) > 0:
            raise CheckpointError(f"{p}: {EMA_FILE} is missing, but this run kept a moving average (train.ema)")
        else:  # a checkpoint of a run without train.ema: the average starts from the trained weights
            ema.load_state_dict(generator.state_dict())
    if discriminator is not None:
        _load_module(p / "discriminator.safetensors", discriminator, "discriminator")
    load_optimizer(p / "optim_g.safetensors", opt_g)
    if opt_d is not None:
        load_optimizer(p / "optim_d.safetensors", opt_d)
    return state


def _load_module(path: Path, module: torch.nn.Module, kind: str) -> None:
    meta = read_meta(path)
    expect_kind(meta, kind, path)
    check_fit(path, read_header(path), module.state_dict(), f"this {kind}")  # names, shapes, dtypes
    tensors, _ = load_tensors(path, device="cpu")
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:  # (checked above; kept as a last guard)
        raise CheckpointError(f"{path}: {kind} weights do not fit this model ({str(exc).splitlines()[0]})") from None


def verify_checkpoint(ckpt: str | os.PathLike[str]) -> dict[str, Any]:
    """Read every file of a checkpoint folder (headers and tensors); raise :class:`CheckpointError` if any is bad.

    Returns:
        ``{'step': ..., 'files': [...]}``.
    """
    p = Path(ckpt)
    state, theirs = read_state(p)
    if float((theirs.get("train") or {}).get("ema") or 0) > 0 and not (p / EMA_FILE).is_file():
        raise CheckpointError(f"{p}: {EMA_FILE} is missing, but this run kept a moving average (train.ema)")
    files = []
    for name, kind in (("generator.safetensors", "generator"), (EMA_FILE, "generator"),
                       ("discriminator.safetensors", "discriminator"),
                       ("optim_g.safetensors", "optimizer"), ("optim_d.safetensors", "optimizer")):
        f = p / name
        if not f.exists() and name in (EMA_FILE, "discriminator.safetensors", "optim_d.safetensors"):
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
    with contextlib.suppress(CheckpointError):  # an unreadable or outside pointer spares nothing
        target = read_pointer(run_dir, LATEST)
        if target is not None:
            spare.add(target.name)
    newest = {p.name for p in ckpts[-keep_last:]} if keep_last > 0 else set()
    gone = [p for p in ckpts if p.name not in newest and p.name not in spare]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone

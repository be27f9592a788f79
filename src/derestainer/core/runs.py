"""The run-folder layout, and how a path given by a user names a checkpoint or a model file.

A training run folder holds::

    <run>/config.yaml, log.jsonl, ...
    <run>/checkpoints/step-0000100/{generator,discriminator,optim_g,optim_d}.safetensors, state.json
    <run>/latest            one line: the newest complete checkpoint, relative to <run>
    <run>/best              one line: the checkpoint with the best validation metric, relative to <run>
    <run>/generator.safetensors    the final generator, once training finished

Checkpoints are written into hidden ``.tmp-*`` folders and renamed into place (``training.state``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from derestainer.core.errors import CheckpointError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
GENERATOR_FILE = "generator.safetensors"
#: The moving average of the generator in a checkpoint folder (runs with ``train.ema``): what they export.
EMA_FILE = "generator_ema.safetensors"
STATE_FILE = "state.json"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"


def checkpoint_dir(run_dir: str | os.PathLike[str], step: int) -> Path:
    """``<run>/checkpoints/step-0000100``."""
    return Path(run_dir) / CHECKPOINTS / f"{STEP_PREFIX}{step:07d}"


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    out = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(out, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def clean_incomplete(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary folders left by a checkpoint write that was interrupted; return them."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def read_pointer(run_dir: str | os.PathLike[str], name: str = LATEST) -> Path | None:
    """The folder a pointer file of a run (``latest``, ``best``) names, or None when there is no pointer.

    A pointer holds one line, a path relative to the run folder. It must stay inside the run folder:
    an absolute path or one that climbs out (``../…``) is refused, so that a run folder handed over
    by someone else cannot send loading or pruning anywhere else. (Symbolic links inside the run
    folder, e.g. ``checkpoints/`` on another disk, are the owner's choice and are followed.)

    Raises:
        CheckpointError: the pointer is unreadable, or names a place outside its run folder.
    """
    root = Path(run_dir)
    pointer = root / name
    if not pointer.is_file():
        return None
    try:
        with open(pointer, "rb") as f:
            raw = f.read(4097)
        text = raw.decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{pointer}: unreadable pointer file ({exc})") from None
    if len(raw) > 4096 or "\n" in text or "\0" in text:
        raise CheckpointError(f"{pointer}: not a pointer file (expected one line, a folder inside {root})")
    if not text:
        return None
    rel = Path(text)
    inside = Path(os.path.normpath(root / rel))
    if rel.is_absolute() or ".." in rel.parts or not inside.is_relative_to(Path(os.path.normpath(root))):
        raise CheckpointError(f"{pointer}: points outside its run folder ({text!r}); expected a folder inside {root}")
    return root / rel


def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint folder from a checkpoint folder, or a run folder (via its ``latest`` pointer).

    Raises:
        CheckpointError: nothing to resume from, or a ``latest`` pointer that leads out of the run folder.
    """
    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    target = read_pointer(p, LATEST)
    if target is not None and (target / STATE_FILE).is_file():
        return target
    found = list_checkpoints(p)  # pointer missing or stale (e.g. its folder was deleted by hand)
    if found:
        return found[-1]
    raise CheckpointError(f"{p}: no checkpoint to resume from (expected a run folder with '{LATEST}' or a checkpoint folder)")


def resolve_generator_file(path: str | os.PathLike[str]) -> Path:
    """The generator file to load for ``path``.

    Accepts an exported model file (``*.safetensors``); a training checkpoint folder
    (``<run>/checkpoints/step-NNNNNNN/``, uses its ``generator_ema.safetensors`` — the moving average
    of a run with ``train.ema`` — else its ``generator.safetensors``); or a run folder (its
    final ``generator.safetensors`` when training finished, else the checkpoint its ``latest``
    pointer names, else its newest checkpoint).

    Raises:
        CheckpointError: nothing loadable there, or a ``latest`` pointer that leads out of the run folder.
    """
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise CheckpointError(f"{p}: no such model file or checkpoint folder")
    for name in (EMA_FILE, GENERATOR_FILE):
        if (p / name).is_file():
            return p / name
    read_pointer(p, LATEST)  # a pointer leading out of the run folder is refused, with its own message
    try:
        ckpt = find_checkpoint(p)
    except CheckpointError:
        ckpt = None
    for name in (EMA_FILE, GENERATOR_FILE):
        if ckpt is not None and (ckpt / name).is_file():
            return ckpt / name
    raise CheckpointError(
        f"{p}: no {GENERATOR_FILE} here (expected an exported model file, a checkpoint folder, or a run folder)"
    )

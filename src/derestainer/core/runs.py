"""The run-folder layout, and how a path given by a user names a checkpoint or a model file.

A training run folder holds::

    <run>/config.yaml, log.jsonl, ...
    <run>/checkpoints/step-0000100/{generator,discriminator,optim_g,optim_d}.safetensors, state.json
    <run>/latest            one line: the newest complete checkpoint, relative to <run>
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
GENERATOR_FILE = "generator.safetensors"
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


def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint folder from a checkpoint folder, or a run folder (via its ``latest`` pointer).

    Raises:
        CheckpointError: nothing to resume from.
    """
    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    pointer = p / LATEST
    if pointer.is_file():
        target = p / pointer.read_text().strip()
        if (target / STATE_FILE).is_file():
            return target
    found = list_checkpoints(p)  # pointer missing or stale (e.g. its folder was deleted by hand)
    if found:
        return found[-1]
    raise CheckpointError(f"{p}: no checkpoint to resume from (expected a run folder with '{LATEST}' or a checkpoint folder)")


def resolve_generator_file(path: str | os.PathLike[str]) -> Path:
    """The generator file to load for ``path``.

    Accepts an exported model file (``*.safetensors``); a training checkpoint folder
    (``<run>/checkpoints/step-NNNNNNN/``, uses its ``generator.safetensors``); or a run folder (its
    final ``generator.safetensors`` when training finished, else the checkpoint its ``latest``
    pointer names, else its newest checkpoint).

    Raises:
        CheckpointError: nothing loadable there.
    """
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise CheckpointError(f"{p}: no such model file or checkpoint folder")
    if (p / GENERATOR_FILE).is_file():
        return p / GENERATOR_FILE
    try:
        ckpt = find_checkpoint(p)
    except CheckpointError:
        ckpt = None
    if ckpt is not None and (ckpt / GENERATOR_FILE).is_file():
        return ckpt / GENERATOR_FILE
    raise CheckpointError(
        f"{p}: no {GENERATOR_FILE} here (expected an exported model file, a checkpoint folder, or a run folder)"
    )

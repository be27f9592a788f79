"""Device choice: one rule for training, inference, evaluation and the speed benchmark."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from derestainer.core.errors import DeviceError


def mps_available() -> bool:
    """Whether Apple's Metal backend can be used."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device = "auto", local_rank: int | None = None) -> torch.device:
    """The device ``device`` names.

    ``auto`` → CUDA if available, else Apple MPS if available, else CPU. ``auto`` and a bare ``cuda``
    pick ``cuda:<local_rank>`` (default: ``LOCAL_RANK`` from ``torchrun``, else 0, modulo the number
    of cards); ``cuda:N``, ``mps`` and ``cpu`` are taken as given.

    Raises:
        DeviceError: the device is unknown or not available here.
    """
    spec = str(device).strip() or "auto"
    rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    if spec == "auto":
        if torch.cuda.is_available():
            spec = "cuda"
        elif mps_available():
            return torch.device("mps")
        else:
            return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError) as exc:
        raise DeviceError(f"unknown device {spec!r} (expected auto, cpu, cuda, cuda:N or mps)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec!r} was asked for, but CUDA is not available; use --device cpu or auto")
        if dev.index is None:
            dev = torch.device("cuda", rank % max(1, torch.cuda.device_count()))
        elif dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {spec!r} was asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not mps_available():
        raise DeviceError(f"device {spec!r} was asked for, but Apple MPS is not available")
    return dev


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the duration of the block, then the number before (None: as is).

    It sets the calling thread's pool: call it from the thread that runs the work."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)

"""Where a timed training step gets its batch: held in memory, or read by a DataLoader each step.

``memory``: the dataset's first items, decoded once, as uint8 tensors (the step alone).
``disk``: a DataLoader over the real dataset with the trainer's sampler and workers (the step plus
decoding, resizing and augmentation, as in a real run).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from derestainer.speed.spec import LoaderMode
from derestainer.training.loop import Trainer

#: One loader kind actually timed.
Loader = Literal["memory", "disk"]


def loaders_of(mode: LoaderMode) -> tuple[Loader, ...]:
    """The loaders ``mode`` times: ``both`` → ``('memory', 'disk')``."""
    return ("memory", "disk") if mode == "both" else (mode,)


def memory_batch(trainer: Trainer, batch: int) -> dict[str, torch.Tensor]:
    """The first ``batch`` items of the trainer's training set (epoch 0), stacked."""
    items = [trainer.train_set[(0, i)] for i in range(batch)]
    return {"he": torch.stack([it["he"] for it in items]), "ihc": torch.stack([it["ihc"] for it in items]),
            "level": torch.tensor([it["level"] for it in items])}


def forever(loader: Iterable[Any]) -> Iterator[Any]:
    """Batches of ``loader``, epoch after epoch."""
    while True:
        yield from loader


def _memory_step(trainer: Trainer, batch: dict[str, torch.Tensor]) -> Any:
    return trainer.train_step([batch])


def _disk_step(trainer: Trainer, batches: Iterator[Any]) -> Any:
    return trainer.train_step([next(batches)])


def disk_batches(trainer: Trainer, batch: int, device: torch.device) -> Iterator[Any]:
    """Endless batches read by a DataLoader over the trainer's training set, sampler and workers."""
    trainer.sampler.set_epoch(0)
    workers = trainer.cfg.data.workers
    dl = DataLoader(trainer.train_set, batch_size=batch, sampler=trainer.sampler, drop_last=True,
                    num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    return forever(dl)


def step_functions(
    trainers: dict[str, Trainer], mode: LoaderMode, batch: int, device: torch.device,
    options: dict[str, dict[str, Any]],
) -> tuple[dict[str, Callable[[], Any]], dict[str, dict[str, Any]]]:
    """One zero-argument training step per (path, loader), named ``path`` or ``path+loader``.

    Names carry the loader unless only the in-memory batch is timed. Returns the steps and each
    one's options (the path's plus ``loader``).
    """
    loaders = loaders_of(mode)
    first = next(iter(trainers.values()))
    mem = memory_batch(first, batch)
    fns: dict[str, Callable[[], Any]] = {}
    opts: dict[str, dict[str, Any]] = {}
    for path, tr in trainers.items():
        for ld in loaders:
            name = f"{path}+{ld}" if len(loaders) > 1 or mode != "memory" else path
            if ld == "memory":
                fns[name] = partial(_memory_step, tr, mem)
            else:
                fns[name] = partial(_disk_step, tr, disk_batches(tr, batch, device))
            opts[name] = {**options[path], "loader": ld}
    return fns, opts

"""The training data order: a seeded, shardable, resumable permutation and per-item seeded augmentation.

See :mod:`derestainer.training.loop` for why this makes a resumed run follow the original one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from derestainer.data.transforms import apply_params, sample_params
from derestainer.training.distributed import mix_seed


class EpochSampler(Sampler[tuple[int, int]]):
    """This rank's share of a permutation seeded by ``(seed, epoch)``, minus the first ``skip`` items.

    Sharding is DistributedSampler's (``perm[rank::world]`` after dropping the tail so that every
    rank gets the same count). Yields ``(epoch, index)`` keys for :class:`SeededPairs`.
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.n, self.rank, self.world, self.seed = n, rank, world_size, seed
        self.epoch, self.skip = 0, 0

    @property
    def per_rank(self) -> int:
        return self.n // self.world

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def indices(self) -> list[int]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=g)[: self.per_rank * self.world]
        out: list[int] = perm[self.rank:: self.world].tolist()
        return out[self.skip:]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, i) for i in self.indices()])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.skip)


class SeededPairs(Dataset):
    """A paired dataset whose random augmentation is a pure function of ``(seed, epoch, index)``.

    ``base`` must be deterministic (resize only); crop, flips and quarter turns are drawn here, with
    :func:`~derestainer.data.transforms.sample_params` from a generator seeded by the item's key,
    and applied identically to both images.
    """

    def __init__(self, base: Dataset, seed: int, crop: int = 0, flip: bool = True, rot90: bool = True) -> None:
        self.base, self.seed, self.crop, self.flip, self.rot90 = base, seed, crop, flip, rot90

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]  # torch's Dataset declares no __len__

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        item = self.base[index]
        he, ihc = item["he"], item["ihc"]
        if self.crop or self.flip or self.rot90:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index))
            p = sample_params(he.shape[-2], he.shape[-1], self.crop, self.flip, self.rot90, generator=g)
            he, ihc = apply_params(he, p), apply_params(ihc, p)
        return {"he": he, "ihc": ihc, "level": int(item["level"]), "name": item["name"]}

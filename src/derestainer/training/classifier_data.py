"""The data of classifier training: which images (subsets, held-out split), their levels, and a resized IHC view.

Only the IHC image and its level are used from the paired datasets' items (``{"he", "ihc", "level",
"name"}``); items with an unknown level (-1, e.g. MIST) are skipped with a message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from derestainer.core.errors import ClassifierDataError
from derestainer.core.io import read_image, to_tensor_uint8
from derestainer.core.ranges import signed_to_uint8
from derestainer.data.datasets import PairedImageDataset
from derestainer.data.datasets import dataset_levels as paired_levels
from derestainer.models.classifier import prepare_images

#: Which training images by index: all, the even ones, or the odd ones.
Subset = Literal["all", "even", "odd"]
SUBSETS: tuple[Subset, ...] = get_args(Subset)
#: Items of a dataset for classifier training: a paired dataset or a list of item dicts.
ItemSource = Sequence[dict[str, Any]] | Dataset


def subset_indices(n: int, subset: Subset) -> list[int]:
    """Indices kept by ``subset``: ``all``, ``even`` (0, 2, 4, ...) or ``odd`` (1, 3, 5, ...)."""
    if subset not in SUBSETS:
        raise ValueError(f"unknown subset {subset!r}; choose one of {', '.join(SUBSETS)}")
    if subset == "all":
        return list(range(n))
    return list(range(0 if subset == "even" else 1, n, 2))


def stratified_split(levels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split positions ``0..len(levels)-1`` into (train, held-out), holding out ``fraction`` of every level.

    Each level with at least 2 items keeps at least one item on each side.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {fraction}")
    g = np.random.default_rng(seed)
    lv = np.asarray(levels)
    train: list[int] = []
    held: list[int] = []
    for level in np.unique(lv):
        idx = np.flatnonzero(lv == level)
        g.shuffle(idx)
        k = round(fraction * idx.size)
        if idx.size >= 2:
            k = min(max(k, 1), idx.size - 1)
        else:
            k = 0
        held += idx[:k].tolist()
        train += idx[k:].tolist()
    return sorted(train), sorted(held)


def _item_level(item: dict[str, Any]) -> int:
    try:
        return int(item["level"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ClassifierDataError(f"dataset items must be dicts with an integer 'level' ({exc})") from None


def dataset_levels(ds: ItemSource) -> list[int]:
    """HER2 level of every item without decoding where possible.

    Uses the ``levels`` attribute of the package's paired datasets (also through ``Subset`` and
    ``ConcatDataset``); any other dataset or list of dicts has its items read.
    """
    if isinstance(ds, Dataset):
        try:
            lv = paired_levels(ds)
        except TypeError:  # no .levels anywhere: read the items
            lv = None
        if lv is not None and len(lv) == len(ds):  # type: ignore[arg-type]
            return [int(v) for v in lv]
    return [_item_level(ds[i]) for i in range(len(ds))]  # type: ignore[arg-type]


def dataset_names(ds: ItemSource, indices: Sequence[int]) -> list[str]:
    """Names of the chosen items: the dataset's ``names`` attribute if it has one, else read items."""
    names = getattr(ds, "names", None)
    if names is not None and len(names) == len(ds):  # type: ignore[arg-type]
        return [str(names[i]) for i in indices]
    return [str(ds[i].get("name", i)) for i in indices]


class IHCView(Dataset):
    """The IHC images and levels of a paired dataset, resized to ``size``: items ``(uint8 [3,S,S], level)``.

    With ``cache=True`` every image is decoded and resized once (:meth:`fill_cache`) and kept in
    memory as uint8 (``3·S²`` bytes each: 0.2 MB at 256 px).
    """

    def __init__(
        self, base: ItemSource, indices: Sequence[int], levels: Sequence[int], size: int
    ) -> None:
        self.base = base
        self.indices = list(indices)
        self.levels = [int(v) for v in levels]
        self.size = int(size)
        self._cache: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> torch.Tensor:
        base = self.base
        if isinstance(base, PairedImageDataset) and base.transform is None and not base.cache:
            # Decode only the IHC image: the H&E half of the pair is not needed here.
            return self._resize(to_tensor_uint8(read_image(base.pairs[self.indices[i]][2])))
        item = base[self.indices[i]]
        ihc = item["ihc"] if isinstance(item, dict) else None
        if not isinstance(ihc, torch.Tensor) or ihc.dtype != torch.uint8 or ihc.dim() != 3 or ihc.shape[0] != 3:
            name = item.get("name", self.indices[i]) if isinstance(item, dict) else self.indices[i]
            raise ClassifierDataError(f"item {name}: expected 'ihc' as a uint8 tensor [3,H,W]")
        return self._resize(ihc)

    def _resize(self, ihc: torch.Tensor) -> torch.Tensor:
        if tuple(ihc.shape[-2:]) == (self.size, self.size):
            return ihc
        return signed_to_uint8(prepare_images(ihc, self.size)[0])

    def fill_cache(self, workers: int = 0, progress: bool = False) -> None:
        cache = torch.empty(len(self), 3, self.size, self.size, dtype=torch.uint8)
        loader = DataLoader(_Loader(self), batch_size=None, num_workers=workers)
        for i, x in enumerate(tqdm(loader, total=len(self), desc="reading images", disable=not progress, leave=False)):
            cache[i] = x
        self._cache = cache

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self._cache[i] if self._cache is not None else self.load(i)
        return x, self.levels[i]


class _Loader(Dataset):
    def __init__(self, view: IHCView) -> None:
        self.view = view

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.view.load(i)


def known_levels(
    indices: Sequence[int], levels: Sequence[int], n_levels: int, what: str, log: Callable[[str], None]
) -> tuple[list[int], list[int]]:
    """Indices and levels of the items with a known level; unknown (-1) skipped with a message."""
    keep = [(i, levels[i]) for i in indices if levels[i] >= 0]
    bad = sorted({levels[i] for i in indices if levels[i] >= n_levels})
    if bad:
        raise ClassifierDataError(f"{what}: HER2 levels {bad} outside 0..{n_levels - 1}")
    dropped = len(indices) - len(keep)
    if dropped and keep:
        log(f"{what}: skipping {dropped} image(s) with unknown HER2 level (-1)")
    if not keep and indices:
        raise ClassifierDataError(
            f"{what}: none of the {len(indices)} images has a known HER2 level (-1 everywhere). "
            "The classifier needs levels: BCI names end in _0/_1+/_2+/_3+; MIST has no per-image level"
        )
    return [i for i, _ in keep], [lv for _, lv in keep]

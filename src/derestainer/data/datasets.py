"""Paired H&E / IHC datasets: the BCI and MIST layouts as published, and any two folders paired by name.

Every dataset yields ``{"he": uint8 [3,H,W], "ihc": uint8 [3,H,W], "level": int, "name": str}``
(level 0..3 for HER2 0/1+/2+/3+, -1 when unknown; name = the file stem shared by both images).
Convert to the model's ``[-1, 1]`` with :func:`derestainer.data.transforms.to_model_space`.

Checks happen in two places, and always name the file:

* **At construction** (cheap, no decoding): missing folders (the message shows the expected layout),
  empty folders, duplicate stems, H&E images without an IHC partner and the reverse (one error listing
  the unmatched files), unknown BCI labels. ``dataset.names`` and ``dataset.levels`` are therefore
  available without opening any image (the classifier trainer needs only those).
* **When an item is loaded**: unreadable or truncated images raise
  :class:`derestainer.core.io.ImageReadError`; two images of a pair with different sizes raise
  :class:`PairSizeError` naming both files and sizes. ``verify=True`` (or :func:`check`) decodes every
  pair up front and reports all failures at once.

Images are read by :func:`derestainer.core.io.read_image`, which converts other modes to RGB: grayscale
(L, 1, 16-bit I;16) is replicated to three channels (16-bit scaled to 8 bits), palette images are
expanded, and RGBA/LA are composited over white (the colour of an empty glass slide).

``cache=True`` keeps each decoded pair, already resized by the transform's deterministic part, in
memory (e.g. 2 × 512² × 3 bytes = 1.5 MB per pair; BCI's 3896 training pairs need about 6 GB). A
DataLoader worker fills its own copy of a lazily filled cache and loses it at the end of the epoch
unless ``persistent_workers=True``; call :meth:`PairedImageDataset.preload` before creating the
loader so that forked workers share the filled cache (:func:`build_dataset` does this when
``data.cache`` and ``data.workers > 0``).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from derestainer.core.errors import DatasetError, ImageReadError, PairSizeError
from derestainer.core.io import IMAGE_SUFFIXES, check_image, list_images, read_image, to_tensor_uint8
from derestainer.core.levels import BCI_NAME, HER2_LEVELS, LEVEL_TOKENS, UNKNOWN, parse_bci_level, parse_level, read_labels_csv
from derestainer.data.transforms import PairedTransform, build_transform

if TYPE_CHECKING:
    from derestainer.core.config import DataConfig

PathLike = str | os.PathLike[str]
PairTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
LevelSource = PathLike | Mapping[str, int] | Callable[[str], int] | None

#: How many unmatched / failing files an error message lists before "... and N more".
_SHOW = 5


# ----------------------------------------------------------------------------- helpers
def _short_list(items: Sequence[Any]) -> str:
    shown = ", ".join(str(x) for x in items[:_SHOW])
    return shown + (f" ... and {len(items) - _SHOW} more" if len(items) > _SHOW else "")


# ----------------------------------------------------------------------------- pairing
def _images_by_stem(folder: Path, role: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: {role} folder not found")
    files = list_images(folder)
    if not files:
        raise DatasetError(f"{folder}: {role} folder is empty (no {'/'.join(IMAGE_SUFFIXES)} images)")
    by_stem: dict[str, Path] = {}
    dups: list[str] = []
    for f in files:
        if f.stem in by_stem:
            dups.append(f"{by_stem[f.stem].name} / {f.name}")
        by_stem[f.stem] = f
    if dups:
        raise DatasetError(f"{folder}: {len(dups)} file name(s) differ only by suffix, so pairing is ambiguous: {_short_list(dups)}")
    return by_stem


def pair_folders(he_dir: PathLike, ihc_dir: PathLike) -> list[tuple[str, Path, Path]]:
    """Pair the images of two folders by file stem: ``[(stem, he_path, ihc_path)]`` sorted by stem.

    Raises:
        DatasetError: a folder is missing or empty, or some images have no partner (both directions
            are listed in one message: first few names and the count).
    """
    he_dir, ihc_dir = Path(he_dir), Path(ihc_dir)
    he = _images_by_stem(he_dir, "H&E")
    ihc = _images_by_stem(ihc_dir, "IHC")
    only_he = sorted(he.keys() - ihc.keys())
    only_ihc = sorted(ihc.keys() - he.keys())
    if only_he or only_ihc:  # one line naming the folders and the first unpaired files
        parts = []
        if only_he:
            parts.append(f"{he_dir}: {len(only_he)} H&E image(s) without an IHC partner in {ihc_dir} "
                         f"({_short_list([he[s].name for s in only_he])})")
        if only_ihc:
            parts.append(f"{ihc_dir}: {len(only_ihc)} IHC image(s) without an H&E partner in {he_dir} "
                         f"({_short_list([ihc[s].name for s in only_ihc])})")
        raise DatasetError("; ".join(parts) + "; every H&E image needs an IHC image of the same file name "
                           "(the suffix may differ)")
    return [(s, he[s], ihc[s]) for s in sorted(he)]


# ----------------------------------------------------------------------------- datasets
class PairedImageDataset(Dataset):
    """Base class: a list of ``(name, he_path, ihc_path)`` pairs with a HER2 level each.

    Args:
        pairs: ``[(name, he_path, ihc_path)]``.
        levels: one int per pair (0..3, -1 unknown).
        transform: ``f(he, ihc) -> (he, ihc)`` on ``uint8 [3,H,W]``; a :class:`PairedTransform` has its
            deterministic part (resize) cached when ``cache`` is set.
        cache: keep decoded (and resized) pairs in memory.
        verify: decode every pair now (see :func:`check`); with ``cache`` this also fills the cache.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, PathLike, PathLike]],
        levels: Sequence[int],
        *,
        transform: PairTransform | None = None,
        cache: bool = False,
        verify: bool = False,
    ) -> None:
        if len(pairs) != len(levels):
            raise ValueError(f"{len(pairs)} pairs but {len(levels)} levels")
        self.pairs: list[tuple[str, Path, Path]] = [(str(n), Path(h), Path(i)) for n, h, i in pairs]
        self.levels: list[int] = [int(v) for v in levels]
        self.names: list[str] = [p[0] for p in self.pairs]
        self.transform = transform
        self.cache = bool(cache)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if verify:
            check(self)

    def __len__(self) -> int:
        return len(self.pairs)

    def subset(self, indices: Sequence[int]) -> PairedImageDataset:
        """A dataset of the pairs at ``indices`` (same transform and cache setting, what is cached kept)."""
        sub = PairedImageDataset([self.pairs[i] for i in indices], [self.levels[i] for i in indices],
                                 transform=self.transform, cache=self.cache)
        sub._cache = {k: self._cache[i] for k, i in enumerate(indices) if i in self._cache}  # keep a preloaded cache
        return sub

    def load_pair(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode pair ``index`` as ``uint8 [3,H,W]`` tensors, no transform. Raises ImageReadError or
        PairSizeError naming the file(s)."""
        name, he_path, ihc_path = self.pairs[index]
        he = read_image(he_path)
        ihc = read_image(ihc_path)
        if he.shape != ihc.shape:
            raise PairSizeError(
                f"pair {name!r}: H&E {he_path} is {he.shape[0]}x{he.shape[1]} (HxW) but IHC {ihc_path} is "
                f"{ihc.shape[0]}x{ihc.shape[1]}; both images of a pair must have the same size")
        return to_tensor_uint8(he), to_tensor_uint8(ihc)

    def _prepared(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded pair after the transform's deterministic part (cached if enabled)."""
        if self.cache and index in self._cache:
            return self._cache[index]
        he, ihc = self.load_pair(index)
        if isinstance(self.transform, PairedTransform):
            he, ihc = self.transform.prepare(he, ihc)
        if self.cache:
            self._cache[index] = (he, ihc)
        return he, ihc

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        he, ihc = self._prepared(index)
        if self.cache:
            # Transforms may return their input unchanged: hand out copies, so that a caller writing
            # into a batch cannot corrupt the cached pair for later epochs.
            he, ihc = he.clone(), ihc.clone()
        if isinstance(self.transform, PairedTransform):
            he, ihc = self.transform.augment(he, ihc)
        elif self.transform is not None:
            he, ihc = self.transform(he, ihc)
        return {"he": he, "ihc": ihc, "level": self.levels[index], "name": self.names[index]}

    def preload(self, workers: int = 4) -> None:
        """Decode (and resize) every pair into the cache now; turns ``cache`` on. Raises like :func:`check`."""
        self.cache = True
        check(self, workers=workers)

    def __repr__(self) -> str:
        counts = dict(sorted(Counter(self.levels).items()))
        return f"{type(self).__name__}({len(self)} pairs, levels={counts}, transform={self.transform!r}, cache={self.cache})"


class BCIDataset(PairedImageDataset):
    """The BCI dataset (Liu et al., CVPR-W 2022) as distributed.

    Layout: ``root/HE/{train,test}/NNNNN_{split}_{0|1+|2+|3+}.png`` and the same names under
    ``root/IHC/{train,test}``; the HER2 level is parsed from the name (an unknown label is an error
    naming the file). Images are 1024 px; the paper trains at 512 (``PairedTransform(512)``).
    """

    SPLITS = ("train", "test")

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        transform: PairTransform | None = None,
        *,
        cache: bool = False,
        verify: bool = False,
    ) -> None:
        if split not in self.SPLITS:
            raise ValueError(f"BCI split must be one of {self.SPLITS}, got {split!r}")
        root = Path(root)
        he_dir, ihc_dir = root / "HE" / split, root / "IHC" / split
        missing = [str(d) for d in (he_dir, ihc_dir) if not d.is_dir()]
        if missing:
            raise DatasetError(
                f"{root}: not a BCI dataset folder; expected ROOT/HE/{{train,test}} and ROOT/IHC/{{train,test}} "
                f"with files NNNNN_{{split}}_{{0|1+|2+|3+}}.png; missing: {', '.join(missing)}")
        pairs = pair_folders(he_dir, ihc_dir)
        levels = [parse_bci_level(he) for _, he, _ in pairs]
        self.root, self.split = root, split
        super().__init__(pairs, levels, transform=transform, cache=cache, verify=verify)


class MISTDataset(PairedImageDataset):
    """The MIST dataset (Li et al., MICCAI 2023), one stain (e.g. ``MIST/HER2``) as distributed.

    Layout: ``root/TrainValAB/{trainA,trainB,valA,valB}`` with A = H&E and B = IHC, pairs sharing a
    file name; ``root`` may also be the ``TrainValAB`` folder itself. MIST has no HER2 labels
    (level -1). ``split='test'`` is accepted for ``'val'``: MIST's held-out set, used as its test set.
    """

    SPLITS = ("train", "val")

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        transform: PairTransform | None = None,
        *,
        cache: bool = False,
        verify: bool = False,
    ) -> None:
        if split == "test":
            split = "val"
        if split not in self.SPLITS:
            raise ValueError(f"MIST split must be one of {self.SPLITS} (or 'test' for 'val'), got {split!r}")
        root = Path(root)
        base = root / "TrainValAB" if (root / "TrainValAB").is_dir() or not (root / f"{split}A").is_dir() else root
        he_dir, ihc_dir = base / f"{split}A", base / f"{split}B"
        missing = [str(d) for d in (he_dir, ihc_dir) if not d.is_dir()]
        if missing:
            raise DatasetError(
                f"{root}: not a MIST dataset folder; expected ROOT/TrainValAB/{{trainA,trainB,valA,valB}} "
                f"(A = H&E, B = IHC, same file names); missing: {', '.join(missing)}")
        pairs = pair_folders(he_dir, ihc_dir)
        self.root, self.split = root, split
        super().__init__(pairs, [-1] * len(pairs), transform=transform, cache=cache, verify=verify)


class PairedFolderDataset(PairedImageDataset):
    """Any two folders of images paired by file stem (suffixes may differ, e.g. ``a.png`` / ``a.jpg``).

    ``levels`` gives the HER2 level per pair: a ``name,level`` CSV path, a mapping ``{stem: level}`` or
    a callable ``f(stem) -> level`` (levels as 0..3 or '0', '1+', '2+', '3+'; -1 unknown). Without it,
    BCI-style names (``NNNNN_split_2+``) give their level and other names -1. Pairs missing from a CSV
    or mapping get -1 (with one warning giving the count).
    """

    def __init__(
        self,
        he_dir: PathLike,
        ihc_dir: PathLike,
        levels: LevelSource = None,
        transform: PairTransform | None = None,
        *,
        cache: bool = False,
        verify: bool = False,
    ) -> None:
        pairs = pair_folders(he_dir, ihc_dir)
        stems = [s for s, _, _ in pairs]
        if levels is None:
            # a BCI-style name (NNNNN_{split}_{level}) gives its level, any other name "unknown"
            lv = [LEVEL_TOKENS.get(m.group("label"), UNKNOWN) if (m := BCI_NAME.match(s)) else UNKNOWN for s in stems]
        elif callable(levels) and not isinstance(levels, (str, os.PathLike, Mapping)):
            lv = [parse_level(levels(s), f"level of {s!r} from {getattr(levels, '__name__', levels)!r}") for s in stems]
        else:
            table = read_labels_csv(levels) if isinstance(levels, (str, os.PathLike)) else dict(levels)
            unlabelled = [s for s in stems if s not in table]
            if unlabelled:
                warnings.warn(f"{len(unlabelled)} of {len(stems)} pairs have no level in the level table "
                              f"(level -1): {_short_list(unlabelled)}", stacklevel=2)
            lv = [parse_level(table.get(s, UNKNOWN), f"level of {s!r}") for s in stems]
        self.he_dir, self.ihc_dir = Path(he_dir), Path(ihc_dir)
        super().__init__(pairs, lv, transform=transform, cache=cache, verify=verify)


# ----------------------------------------------------------------------------- helpers
def check_headers(dataset: Dataset) -> None:
    """Check every pair's two image headers without decoding (cheap: a training run calls it before
    it writes anything): each file exists and is a readable image within the pixel limit, and the two
    images of a pair have the same size.

    Raises:
        ImageReadError: naming the file; PairSizeError: naming both files and their sizes.
    """
    for name, he_path, ihc_path in getattr(dataset, "pairs", ()):
        (hw, hh), (iw, ih) = check_image(he_path), check_image(ihc_path)
        if (hw, hh) != (iw, ih):
            raise PairSizeError(
                f"pair {name!r}: H&E {he_path} is {hh}x{hw} (HxW) but IHC {ihc_path} is {ih}x{iw}; "
                "both images of a pair must have the same size")


def check(dataset: PairedImageDataset, workers: int = 4) -> None:
    """Decode every pair of ``dataset`` (in threads) and raise one :class:`DatasetError` listing all
    unreadable/truncated files and size mismatches (first few, and the count). Fills the cache when
    the dataset has ``cache`` on."""
    def one(i: int) -> str | None:
        try:
            dataset._prepared(i) if dataset.cache else dataset.load_pair(i)
        except (ImageReadError, DatasetError) as exc:
            return str(exc)
        return None

    n = len(dataset)
    if workers > 1 and n > 1:
        with ThreadPoolExecutor(max_workers=min(workers, n)) as pool:
            results = list(pool.map(one, range(n)))
    else:
        results = [one(i) for i in range(n)]
    errors = [r for r in results if r is not None]
    if errors:
        shown = "; ".join(errors[:_SHOW])
        more = f"; ... and {len(errors) - _SHOW} more" if len(errors) > _SHOW else ""
        raise DatasetError(f"{len(errors)} of {n} pairs cannot be loaded: {shown}{more}")


def dataset_levels(dataset: Dataset) -> list[int]:
    """HER2 level per item without decoding images; understands :class:`Subset` and :class:`ConcatDataset`."""
    if isinstance(dataset, Subset):
        parent = dataset_levels(dataset.dataset)
        return [parent[i] for i in dataset.indices]
    if isinstance(dataset, ConcatDataset):
        return [lv for d in dataset.datasets for lv in dataset_levels(d)]
    levels = getattr(dataset, "levels", None)
    if levels is None:
        raise TypeError(f"{type(dataset).__name__} has no .levels; use a derestainer paired dataset")
    return list(levels)


def pair_level_counts(dataset: Dataset) -> dict[int, int]:
    """Pairs per HER2 level ``{0: n0, 1: n1, 2: n2, 3: n3}`` (plus ``-1`` when some are unknown)."""
    counts = Counter(dataset_levels(dataset))
    out = {lv: counts.get(lv, 0) for lv in range(len(HER2_LEVELS))}
    if counts.get(-1):
        out = {-1: counts[-1], **out}
    return out


def build_dataset(
    data_cfg: DataConfig,
    split: str,
    *,
    train: bool | None = None,
    seed: int | None = None,
    verify: bool = False,
) -> PairedImageDataset:
    """The dataset of ``split`` described by ``data_cfg`` (``layout`` bci | mist | folders).

    The training transform (resize, crop, flips, rotations) is used when ``train`` is True, or, when
    ``train`` is None, when ``split == data_cfg.train_split``; otherwise the deterministic one (resize
    only). For ``layout=folders``, ``he_dir``/``ihc_dir`` may contain ``{split}`` and, when relative,
    are taken under ``root`` if it is set. With ``data_cfg.cache`` and ``workers > 0`` the cache is
    filled now, so that DataLoader workers share it.
    """
    is_train = (split == data_cfg.train_split) if train is None else train
    transform = build_transform(data_cfg, train=is_train, seed=seed)
    kw: dict[str, Any] = {"transform": transform, "cache": data_cfg.cache, "verify": verify}
    layout = data_cfg.layout
    if layout in ("bci", "mist"):
        if not data_cfg.root:
            raise DatasetError(f"data.root is not set; give the {layout.upper()} dataset folder (data.root=PATH)")
        cls = BCIDataset if layout == "bci" else MISTDataset
        ds: PairedImageDataset = cls(data_cfg.root, split, **kw)
    elif layout == "folders":
        if not data_cfg.he_dir or not data_cfg.ihc_dir:
            raise DatasetError("layout=folders needs data.he_dir and data.ihc_dir (they may contain {split})")
        dirs = []
        for d in (data_cfg.he_dir, data_cfg.ihc_dir):
            p = Path(d.replace("{split}", split))
            dirs.append(Path(data_cfg.root) / p if data_cfg.root and not p.is_absolute() else p)
        levels = data_cfg.levels.replace("{split}", split) if data_cfg.levels else None
        if levels and data_cfg.root and not Path(levels).is_absolute():
            levels = str(Path(data_cfg.root) / levels)
        ds = PairedFolderDataset(dirs[0], dirs[1], levels=levels, **kw)
    else:
        raise DatasetError(f"unknown data.layout {layout!r}; choose bci, mist or folders")
    if data_cfg.cache and data_cfg.workers > 0 and not verify:
        ds.preload()
    return ds

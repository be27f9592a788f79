"""Training the HER2 IHC classifier (comparator C and semantic evaluator; DESIGN §4, §5).

Choices, each with its reason:

- **Only the IHC image and its level** are used from the paired datasets' items
  (``{"he", "ihc", "level", "name"}``); items with an unknown level (-1, e.g. MIST) are skipped with
  a message, and a set with fewer than two known levels is refused.
- **Class balance by sampling**, not by loss weights: a :class:`~torch.utils.data.WeightedRandomSampler`
  draws every level equally often (weight ``1/count(level)``, with replacement). BCI is imbalanced
  (few HER2 0 and 3+), and balanced batches also give BatchNorm balanced statistics, which loss
  weights would not. ``balance='none'`` samples uniformly instead.
- **Light augmentation**, applied on the batch with a seeded generator (so the result does not
  depend on the number of loader workers): random horizontal/vertical flips and 90° rotations
  (staining is orientation-free) and a *small* colour jitter (brightness, contrast, saturation,
  each ±``jitter``, default 5 %). Jitter stays small on purpose: DAB intensity *is* the HER2 signal,
  and strong colour augmentation would blur 2+ into 3+.
- **Whole images resized** (bilinear, antialiased) to ``size × size`` with
  :func:`~derestainer.models.classifier.prepare_images`, the same function the comparator and the
  evaluation use, so that everyone sees images the way the classifier was trained on them.
- **AdamW** with linear warm-up then cosine decay to zero; cross-entropy; bf16 autocast and
  channels-last on CUDA.
- **Seeded**: initialisation, sampling, augmentation and any held-out split derive from ``seed``;
  on CPU two runs with the same arguments give identical weights.
- **Independent evaluator**: train it with another ``seed`` and, where data allows, another
  ``subset`` (``even``/``odd`` split the training images by index, so comparator and evaluator
  never share an image). Seed and a hash of the training image names are stored in the checkpoint
  (see :func:`~derestainer.models.classifier.independence_warnings`).
- **Validation**: accuracy, balanced accuracy and the confusion matrix (rows = true level, columns
  = predicted) on ``val_data`` (e.g. the BCI test split) or, without one, on a stratified
  ``val_fraction`` held out of the training images. Computed once, after the last step: the model
  written is the final one, not the one that looked best on the validation images.
- Outputs: the checkpoint (:func:`~derestainer.models.classifier.save_classifier`, atomic) and a
  JSON report beside it (``X.safetensors`` → ``X.json``).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler, WeightedRandomSampler

from ..models.classifier import LEVEL_NAMES, HER2Classifier, names_hash, prepare_images, save_classifier

SUBSETS: tuple[str, ...] = ("all", "even", "odd")
BALANCES: tuple[str, ...] = ("sampler", "none")
DEFAULT_STEPS = 2000


class ClassifierDataError(ValueError):
    """The training or validation data cannot train a HER2 classifier (no levels, one level, empty...)."""


# --------------------------------------------------------------------------------------------------
# Pure helpers


def confusion_matrix(true: Sequence[int] | np.ndarray, pred: Sequence[int] | np.ndarray, n_levels: int = 4) -> np.ndarray:
    """``[n_levels, n_levels]`` int64 counts; rows = true level, columns = predicted level."""
    t = np.asarray(true, dtype=np.int64).ravel()
    p = np.asarray(pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"true and pred differ in length ({t.size} vs {p.size})")
    if t.size and (t.min() < 0 or t.max() >= n_levels or p.min() < 0 or p.max() >= n_levels):
        raise ValueError(f"levels must lie in 0..{n_levels - 1}")
    return np.bincount(t * n_levels + p, minlength=n_levels * n_levels).reshape(n_levels, n_levels)


def classification_metrics(confusion: np.ndarray) -> dict[str, Any]:
    """Accuracy, balanced accuracy (mean recall over levels present) and per-level recall from a confusion matrix.

    Levels absent from the true labels have recall ``None`` and do not enter the balanced accuracy.
    """
    cm = np.asarray(confusion, dtype=np.int64)
    n = int(cm.sum())
    support = cm.sum(axis=1)
    recall = [float(cm[i, i] / support[i]) if support[i] else None for i in range(cm.shape[0])]
    present = [r for r in recall if r is not None]
    return {
        "accuracy": float(np.trace(cm) / n) if n else None,
        "balanced_accuracy": float(np.mean(present)) if present else None,
        "per_level_recall": recall,
        "support": [int(s) for s in support],
        "n": n,
        "confusion": cm.tolist(),
    }


def format_confusion(confusion: np.ndarray | Sequence[Sequence[int]], names: Sequence[str] = LEVEL_NAMES) -> str:
    """Plain-text confusion matrix (rows = true level, columns = predicted), for the terminal."""
    cm = np.asarray(confusion, dtype=np.int64)
    names = list(names)[: cm.shape[0]] + [str(i) for i in range(len(names), cm.shape[0])]
    w = max(6, max(len(str(int(v))) for v in cm.ravel()) + 2 if cm.size else 6)
    lines = ["true\\pred".ljust(10) + "".join(n.rjust(w) for n in names)]
    for name, row in zip(names, cm, strict=False):
        lines.append(name.ljust(10) + "".join(str(int(v)).rjust(w) for v in row))
    return "\n".join(lines)


def subset_indices(n: int, subset: str) -> list[int]:
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
        k = int(round(fraction * idx.size))
        if idx.size >= 2:
            k = min(max(k, 1), idx.size - 1)
        else:
            k = 0
        held += idx[:k].tolist()
        train += idx[k:].tolist()
    return sorted(train), sorted(held)


def lr_lambda(steps: int, warmup: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at step ``s``: linear warm-up, then cosine to zero."""

    def f(s: int) -> float:
        if warmup > 0 and s < warmup:
            return (s + 1) / warmup
        t = (s - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return f


def augment_batch(x: torch.Tensor, generator: torch.Generator, jitter: float = 0.05) -> torch.Tensor:
    """Random flips, 90° rotations and small colour jitter, per sample. ``[N,3,S,S]`` in ``[-1,1]`` → same.

    Random numbers come from ``generator`` (on the CPU) so that results are seeded and device-independent.
    Rotations need square images (the training images are resized to ``size × size``).
    """
    n = x.shape[0]
    u = torch.rand(n, 6, generator=generator)
    k = torch.randint(0, 4, (n,), generator=generator)
    dev = x.device
    hflip = (u[:, 0] < 0.5).to(dev).view(n, 1, 1, 1)
    vflip = (u[:, 1] < 0.5).to(dev).view(n, 1, 1, 1)
    x = torch.where(hflip, x.flip(-1), x)
    x = torch.where(vflip, x.flip(-2), x)
    if x.shape[-1] == x.shape[-2]:
        out = x.clone()
        for r in (1, 2, 3):
            sel = (k == r).nonzero().flatten().to(dev)
            if sel.numel():
                out[sel] = torch.rot90(x[sel], r, dims=(-2, -1))
        x = out
    if jitter > 0:
        b, c, s = (1.0 + jitter * (2.0 * u[:, 2:5] - 1.0)).to(dev, x.dtype).unbind(1)
        y = (x + 1.0) * 0.5 * b.view(n, 1, 1, 1)
        gray = (0.299 * y[:, 0] + 0.587 * y[:, 1] + 0.114 * y[:, 2]).unsqueeze(1)
        m = gray.mean(dim=(2, 3), keepdim=True)
        y = (y - m) * c.view(n, 1, 1, 1) + m
        gray = (0.299 * y[:, 0] + 0.587 * y[:, 1] + 0.114 * y[:, 2]).unsqueeze(1)
        y = gray + (y - gray) * s.view(n, 1, 1, 1)
        x = y.clamp(0.0, 1.0) * 2.0 - 1.0
    return x


# --------------------------------------------------------------------------------------------------
# Data


def _item_level(item: dict[str, Any]) -> int:
    try:
        return int(item["level"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ClassifierDataError(f"dataset items must be dicts with an integer 'level' ({exc})") from None


def dataset_levels(ds: Sequence[dict[str, Any]] | Dataset) -> list[int]:
    """HER2 level of every item without decoding where possible.

    Uses the ``levels`` attribute of the package's paired datasets (also through ``Subset`` and
    ``ConcatDataset``); any other dataset or list of dicts has its items read.
    """
    from ..data.datasets import dataset_levels as paired_levels

    if isinstance(ds, Dataset):
        try:
            lv = paired_levels(ds)
        except TypeError:  # no .levels anywhere: read the items
            lv = None
        if lv is not None and len(lv) == len(ds):  # type: ignore[arg-type]
            return [int(v) for v in lv]
    return [_item_level(ds[i]) for i in range(len(ds))]  # type: ignore[arg-type]


def dataset_names(ds: Sequence[dict[str, Any]] | Dataset, indices: Sequence[int]) -> list[str]:
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
        self, base: Sequence[dict[str, Any]] | Dataset, indices: Sequence[int], levels: Sequence[int], size: int
    ) -> None:
        self.base = base
        self.indices = list(indices)
        self.levels = [int(v) for v in levels]
        self.size = int(size)
        self._cache: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> torch.Tensor:
        from ..data.datasets import PairedImageDataset
        from ..io import read_image, to_tensor_uint8

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
        x = prepare_images(ihc, self.size)[0]
        return x.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)

    def fill_cache(self, workers: int = 0, progress: bool = False) -> None:
        from tqdm.auto import tqdm

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


def _known(
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


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available; use --device cpu or auto")
    return dev


# --------------------------------------------------------------------------------------------------
# Evaluation and training


@torch.no_grad()
def evaluate_classifier(
    model: HER2Classifier,
    data: IHCView | Dataset,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    workers: int = 0,
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-level recall and confusion matrix on items ``(uint8 image, level)``."""
    dev = torch.device(device)
    was_training = model.training
    model.eval()
    true: list[int] = []
    pred: list[int] = []
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers)
    for x, y in loader:
        logits = model(prepare_images(x.to(dev)))
        pred += logits.argmax(1).cpu().tolist()
        true += torch.as_tensor(y).tolist()
    model.train(was_training)
    return classification_metrics(confusion_matrix(true, pred, model.n_levels))


def report_path(out: str | os.PathLike[str]) -> Path:
    """The JSON report written beside a checkpoint: ``X.safetensors`` → ``X.json``."""
    p = Path(out)
    if p.suffix == ".json":
        raise ValueError(f"{p}: the checkpoint path must not end in .json (the report is written beside it as .json)")
    return p.with_name(p.stem + ".json") if p.suffix else p.with_name(p.name + ".json")


def fit_classifier(
    train_data: Sequence[dict[str, Any]] | Dataset,
    *,
    arch: str = "resnet50",
    size: int = 256,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 32,
    lr: float = 3e-4,
    weight_decay: float = 1e-2,
    warmup: int | None = None,
    seed: int = 0,
    val_data: Sequence[dict[str, Any]] | Dataset | None = None,
    val_fraction: float = 0.1,
    subset: str = "all",
    out: str | os.PathLike[str] | None = None,
    device: str | torch.device = "auto",
    pretrained: str | os.PathLike[str] | None = None,
    n_levels: int = 4,
    balance: str = "sampler",
    augment: bool = True,
    jitter: float = 0.05,
    cache: bool = True,
    workers: int = 0,
    amp: str = "auto",
    progress: bool = True,
    extra_meta: dict[str, Any] | None = None,
    val_name: str | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[HER2Classifier, dict[str, Any]]:
    """Train a :class:`HER2Classifier` on the IHC images and levels of a paired dataset.

    Args:
        train_data: a dataset of dicts with ``ihc`` (uint8 ``[3,H,W]``) and ``level`` (0..3, -1 unknown);
            a ``levels`` attribute (list of ints), when present, spares decoding every image to read labels,
            and a ``names`` attribute is used for the training-set hash.
        arch, n_levels, pretrained: see :class:`HER2Classifier` (``pretrained`` = local ImageNet weights file).
        size: images are resized to ``size × size``.
        steps / epochs: training length (at most one; ``epochs`` counts passes over the kept training images;
            neither → :data:`DEFAULT_STEPS`).
        batch_size, lr, weight_decay, warmup: AdamW and schedule (``warmup`` default ``min(100, steps // 10)``).
        seed: seeds initialisation, sampling, augmentation and the held-out split.
        val_data: validation dataset (e.g. the BCI test split); None → ``val_fraction`` of the training
            images held out, stratified by level (``val_fraction=0`` → no validation).
        subset: ``all`` | ``even`` | ``odd`` training images by index (for an evaluator disjoint from the comparator).
        out: checkpoint path (safetensors), written atomically with a JSON report beside it; None → nothing written.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        balance: ``sampler`` (class-balanced sampling) | ``none``.
        augment, jitter: flips/rot90 and colour jitter amplitude (see module docstring).
        cache: decode and resize every image once and keep them in memory.
        workers: DataLoader workers for decoding.
        amp: ``auto`` (bf16 autocast on CUDA) | ``bf16`` | ``off``.
        extra_meta: more JSON-able facts for the checkpoint metadata (e.g. the data root).
        val_name: how ``val_data`` is described in the report (e.g. ``"split test"``).
        log: where messages go (default: stderr).

    Returns:
        ``(model in eval mode, metrics)``; metrics hold ``accuracy``, ``balanced_accuracy``,
        ``per_level_recall``, ``confusion`` (``[n_levels][n_levels]``, rows true), ``n_val``, ``n_train``,
        ``train_counts``, ``steps``, ``final_loss``, ``seconds`` and, when written, ``checkpoint`` and ``report``.

    Raises:
        ClassifierDataError: no usable labels, fewer than two levels, or an empty set.
        ValueError: bad arguments.
    """
    from tqdm.auto import tqdm

    say = log or (lambda msg: print(msg, file=sys.stderr))
    if balance not in BALANCES:
        raise ValueError(f"unknown balance {balance!r}; choose one of {', '.join(BALANCES)}")
    if amp not in ("auto", "bf16", "off"):
        raise ValueError(f"unknown amp {amp!r}; choose auto, bf16 or off")
    if steps is not None and epochs is not None:
        raise ValueError("give steps or epochs, not both")
    if batch_size < 1 or size < 8:
        raise ValueError(f"batch_size must be ≥ 1 and size ≥ 8 (got {batch_size}, {size})")
    rep_path = report_path(out) if out is not None else None
    dev = _resolve_device(device)
    t0 = time.time()

    # ---- data
    all_levels = dataset_levels(train_data)
    if not all_levels:
        raise ClassifierDataError("the training set is empty")
    chosen = subset_indices(len(all_levels), subset)
    train_idx, train_lv = _known(chosen, all_levels, n_levels, "training set", say)
    val_source = val_name or "val_data"
    if val_data is not None:
        vl_all = dataset_levels(val_data)
        val_idx, val_lv = _known(list(range(len(vl_all))), vl_all, n_levels, "validation set", say)
        val_base = val_data
    elif val_fraction > 0:
        keep, held = stratified_split(train_lv, val_fraction, seed)
        val_idx, val_lv = [train_idx[i] for i in held], [train_lv[i] for i in held]
        train_idx, train_lv = [train_idx[i] for i in keep], [train_lv[i] for i in keep]
        val_base = train_data
        val_source = f"held out {val_fraction:g} of the training images (stratified, seed {seed})"
    else:
        val_idx, val_lv, val_base, val_source = [], [], None, "none"
    counts = np.bincount(np.asarray(train_lv, dtype=np.int64), minlength=n_levels)
    if (counts > 0).sum() < 2:
        raise ClassifierDataError(f"the training images cover fewer than two HER2 levels (counts per level {counts.tolist()})")
    for lvl in np.flatnonzero(counts == 0):
        name = LEVEL_NAMES[lvl] if lvl < len(LEVEL_NAMES) else str(lvl)
        say(f"warning: no training image of HER2 level {name}; the classifier cannot learn it")
    names = dataset_names(train_data, train_idx)

    if steps is None:
        steps = DEFAULT_STEPS if epochs is None else max(1, math.ceil(epochs * len(train_idx) / batch_size))
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    warmup = min(100, steps // 10) if warmup is None else int(warmup)

    train_view = IHCView(train_data, train_idx, train_lv, size)
    val_view = IHCView(val_base, val_idx, val_lv, size) if val_base is not None and val_idx else None
    if cache:
        train_view.fill_cache(workers, progress)
        if val_view is not None:
            val_view.fill_cache(workers, progress)

    # ---- model, sampler, optimiser
    torch.manual_seed(seed)
    model = HER2Classifier(arch=arch, n_levels=n_levels, pretrained_weights=pretrained).to(dev)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        model = model.to(memory_format=torch.channels_last)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if use_cuda and amp in ("auto", "bf16")
        else torch.autocast("cpu", dtype=torch.bfloat16)
        if amp == "bf16"
        else nullcontext()
    )
    g_sample = torch.Generator().manual_seed(seed)
    g_aug = torch.Generator().manual_seed(seed + 1_000_003)
    n_draw = steps * batch_size
    if balance == "sampler":
        w = torch.tensor([1.0 / counts[v] for v in train_lv], dtype=torch.double)
        sampler: Any = WeightedRandomSampler(w, num_samples=n_draw, replacement=True, generator=g_sample)
    else:
        sampler = RandomSampler(train_view, replacement=True, num_samples=n_draw, generator=g_sample)
    loader = DataLoader(
        train_view, batch_size=batch_size, sampler=sampler, num_workers=0 if cache else workers,
        pin_memory=use_cuda, drop_last=False,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, warmup))

    # ---- train
    model.train()
    ema_loss: float | None = None
    ema_acc: float | None = None
    bar = tqdm(total=steps, desc="train-classifier", disable=not progress, dynamic_ncols=True)
    step = 0
    # Loss and accuracy stay on the device and are read every 10 steps (and at the last), so that a
    # step has no host sync; the finiteness check happens then too (a non-finite loss is sticky).
    read_every = 10
    win_loss: list[torch.Tensor] = []
    win_acc: list[torch.Tensor] = []
    win_first = 0  # index of the window's first step

    def read_window() -> None:
        nonlocal ema_loss, ema_acc, win_loss, win_acc, win_first
        if not win_loss:
            return
        losses = torch.stack(win_loss).tolist()  # the one host sync of the window
        accs = torch.stack(win_acc).tolist()
        win_loss, win_acc = [], []
        for i, (lv, acc) in enumerate(zip(losses, accs)):
            if not math.isfinite(lv):
                raise FloatingPointError(f"non-finite loss at step {win_first + i}: lower the learning rate (now {lr:g})")
            ema_loss = lv if ema_loss is None else 0.95 * ema_loss + 0.05 * lv
            ema_acc = acc if ema_acc is None else 0.95 * ema_acc + 0.05 * acc
        win_first = step

    for xb, yb in loader:
        x = prepare_images(xb.to(dev, non_blocking=True))
        y = torch.as_tensor(yb).to(dev)
        if augment:
            x = augment_batch(x, g_aug, jitter)
        if use_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        win_loss.append(loss.detach())
        win_acc.append((logits.detach().argmax(1) == y).float().mean())
        bar.update(1)
        if step % read_every == 0 or step == steps:
            read_window()
            bar.set_postfix(loss=f"{ema_loss:.3f}", acc=f"{ema_acc:.2f}", lr=f"{sched.get_last_lr()[0]:.2e}")
    read_window()  # (empty unless the loader ended early)
    bar.close()
    model.eval()

    # ---- validate, write
    if val_view is not None:
        metrics = evaluate_classifier(model, val_view, batch_size=batch_size, device=dev, workers=0 if cache else workers)
    else:
        metrics = classification_metrics(np.zeros((n_levels, n_levels), dtype=np.int64))
        metrics["confusion"] = None
    metrics = {
        "accuracy": metrics["accuracy"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "per_level_recall": metrics["per_level_recall"],
        "confusion": metrics["confusion"],
        "n_val": len(val_idx),
        "val_source": val_source,
        "n_train": len(train_idx),
        "train_counts": counts.tolist(),
        "steps": steps,
        "final_loss": ema_loss,
        "final_train_accuracy": ema_acc,
        "seconds": round(time.time() - t0, 2),
    }
    model = model.to("cpu").to(memory_format=torch.contiguous_format)
    if out is not None:
        from .. import __version__
        from ..io import write_json

        meta = {
            "levels": list(LEVEL_NAMES[:n_levels]),
            "size": size,
            "seed": seed,
            "subset": subset,
            "train_images_hash": names_hash(names),
            "n_train": len(train_idx),
            "train_counts": counts.tolist(),
            "accuracy": metrics["accuracy"],
            "balanced_accuracy": metrics["balanced_accuracy"],
            "confusion": metrics["confusion"],
            "n_val": len(val_idx),
            "val_source": val_source,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "balance": balance,
            "augment": augment,
            "jitter": jitter if augment else 0.0,
            "pretrained": Path(pretrained).name if pretrained else None,
            "derestainer_version": __version__,
            **(extra_meta or {}),
        }
        ckpt = save_classifier(out, model, meta)
        metrics["checkpoint"] = str(ckpt)
        metrics["report"] = str(rep_path)
        write_json(rep_path, {"kind": "classifier-report", "arch": arch, "n_levels": n_levels, **meta, **metrics})
    return model, metrics


def train_classifier(train_data: Sequence[dict[str, Any]] | Dataset, **kwargs: Any) -> dict[str, Any]:
    """:func:`fit_classifier` returning only the metrics dict (the model is in the checkpoint at ``out``)."""
    return fit_classifier(train_data, **kwargs)[1]

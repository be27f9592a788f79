"""Training the HER2 IHC classifier (comparator C and semantic evaluator; docs/method.md, "Training", "Evaluation").

The job is split by module: :mod:`.classifier_data` (which images, their levels, the resized IHC
view), :mod:`.classifier_loop` (augmentation, schedule, the step loop), :mod:`.classifier_metrics`
(accuracy and confusion matrix); this module holds the options and puts the run together.

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
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler, WeightedRandomSampler

from derestainer.core.config import AmpMode
from derestainer.core.device import resolve_device
from derestainer.core.errors import ClassifierDataError
from derestainer.core.io import write_json
from derestainer.core.levels import HER2_LEVELS
from derestainer.core.version import __version__
from derestainer.models.classifier import ClassifierArch, HER2Classifier, names_hash, save_classifier
from derestainer.training.classifier_data import (
    IHCView,
    ItemSource,
    Subset,
    dataset_levels,
    dataset_names,
    known_levels,
    stratified_split,
    subset_indices,
)
from derestainer.training.classifier_loop import StepSetup, lr_lambda, run_steps
from derestainer.training.classifier_metrics import classification_metrics, evaluate_classifier

#: How training images are drawn: class-balanced sampling, or uniform.
Balance = Literal["sampler", "none"]
BALANCES: tuple[Balance, ...] = get_args(Balance)
#: Mixed precision: ``auto`` (bf16 autocast on CUDA), ``bf16`` (everywhere) or ``off``.
Amp = AmpMode
DEFAULT_STEPS = 2000


@dataclass(frozen=True)
class ClassifierTrainOptions:
    """How :func:`fit_classifier` trains (one field per keyword; same defaults as the CLI).

    Attributes:
        arch, n_levels, pretrained: see :class:`HER2Classifier` (``pretrained`` = local ImageNet weights file).
        size: images are resized to ``size × size``.
        steps / epochs: training length (at most one; ``epochs`` counts passes over the kept training images;
            neither → :data:`DEFAULT_STEPS`).
        batch_size, lr, weight_decay, warmup: AdamW and schedule (``warmup`` default ``min(100, steps // 10)``).
        seed: seeds initialisation, sampling, augmentation and the held-out split.
        val_fraction: without ``val_data``, this fraction of the training images is held out, stratified by
            level (0 → no validation).
        subset: ``all`` | ``even`` | ``odd`` training images by index (for an evaluator disjoint from the comparator).
        out: checkpoint path (safetensors), written atomically with a JSON report beside it; None → nothing written.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        balance: ``sampler`` (class-balanced sampling) | ``none``.
        augment, jitter: flips/rot90 and colour jitter amplitude (see the module docstring).
        cache: decode and resize every image once and keep them in memory.
        workers: DataLoader workers for decoding.
        amp: ``auto`` (bf16 autocast on CUDA) | ``bf16`` | ``off``.
        extra_meta: more JSON-able facts for the checkpoint metadata (e.g. the data root).
        val_name: how ``val_data`` is described in the report (e.g. ``"split test"``).
        log: where messages go (default: stderr).
    """

    arch: ClassifierArch = "resnet50"
    size: int = 256
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 1e-2
    warmup: int | None = None
    seed: int = 0
    val_fraction: float = 0.1
    subset: Subset = "all"
    out: str | os.PathLike[str] | None = None
    device: str | torch.device = "auto"
    pretrained: str | os.PathLike[str] | None = None
    n_levels: int = 4
    balance: Balance = "sampler"
    augment: bool = True
    jitter: float = 0.05
    cache: bool = True
    workers: int = 0
    amp: Amp = "auto"
    progress: bool = True
    extra_meta: dict[str, Any] | None = None
    val_name: str | None = None
    log: Callable[[str], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.balance not in BALANCES:
            raise ValueError(f"unknown balance {self.balance!r}; choose one of {', '.join(BALANCES)}")
        if self.amp not in get_args(Amp):
            raise ValueError(f"unknown amp {self.amp!r}; choose auto, bf16 or off")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        if self.batch_size < 1 or self.size < 8:
            raise ValueError(f"batch_size must be ≥ 1 and size ≥ 8 (got {self.batch_size}, {self.size})")

    def say(self, msg: str) -> None:
        """Send a message to ``log`` (default: stderr)."""
        if self.log is not None:
            self.log(msg)
        else:
            print(msg, file=sys.stderr)


def report_path(out: str | os.PathLike[str]) -> Path:
    """The JSON report written beside a checkpoint: ``X.safetensors`` → ``X.json``."""
    p = Path(out)
    if p.suffix == ".json":
        raise ValueError(f"{p}: the checkpoint path must not end in .json (the report is written beside it as .json)")
    return p.with_name(p.stem + ".json") if p.suffix else p.with_name(p.name + ".json")


@dataclass
class _Split:
    """The images of a run: training and validation indices into their datasets, with levels."""

    train_idx: list[int]
    train_lv: list[int]
    val_idx: list[int]
    val_lv: list[int]
    val_base: ItemSource | None
    val_source: str
    counts: np.ndarray


def _split(train_data: ItemSource, val_data: ItemSource | None, o: ClassifierTrainOptions) -> _Split:
    all_levels = dataset_levels(train_data)
    if not all_levels:
        raise ClassifierDataError("the training set is empty")
    chosen = subset_indices(len(all_levels), o.subset)
    train_idx, train_lv = known_levels(chosen, all_levels, o.n_levels, "training set", o.say)
    val_source = o.val_name or "val_data"
    val_base: ItemSource | None
    if val_data is not None:
        vl_all = dataset_levels(val_data)
        val_idx, val_lv = known_levels(list(range(len(vl_all))), vl_all, o.n_levels, "validation set", o.say)
        val_base = val_data
    elif o.val_fraction > 0:
        keep, held = stratified_split(train_lv, o.val_fraction, o.seed)
        val_idx, val_lv = [train_idx[i] for i in held], [train_lv[i] for i in held]
        train_idx, train_lv = [train_idx[i] for i in keep], [train_lv[i] for i in keep]
        val_base = train_data
        val_source = f"held out {o.val_fraction:g} of the training images (stratified, seed {o.seed})"
    else:
        val_idx, val_lv, val_base, val_source = [], [], None, "none"
    counts = np.bincount(np.asarray(train_lv, dtype=np.int64), minlength=o.n_levels)
    if (counts > 0).sum() < 2:
        raise ClassifierDataError(f"the training images cover fewer than two HER2 levels (counts per level {counts.tolist()})")
    for lvl in np.flatnonzero(counts == 0):
        name = HER2_LEVELS[lvl] if lvl < len(HER2_LEVELS) else str(lvl)
        o.say(f"warning: no training image of HER2 level {name}; the classifier cannot learn it")
    return _Split(train_idx, train_lv, val_idx, val_lv, val_base, val_source, counts)


def _n_steps(o: ClassifierTrainOptions, n_train: int) -> int:
    if o.steps is not None:
        steps = o.steps
    else:
        steps = DEFAULT_STEPS if o.epochs is None else max(1, math.ceil(o.epochs * n_train / o.batch_size))
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    return steps


def _autocast(use_cuda: bool, amp: Amp) -> AbstractContextManager[Any]:
    if use_cuda and amp in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if amp == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def _setup(o: ClassifierTrainOptions, sp: _Split, view: IHCView, steps: int, dev: torch.device) -> StepSetup:
    """Model (seeded), sampler, loader, AdamW and the warm-up/cosine schedule."""
    torch.manual_seed(o.seed)
    model = HER2Classifier(arch=o.arch, n_levels=o.n_levels, pretrained_weights=o.pretrained).to(dev)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        model = model.to(memory_format=torch.channels_last)
    g_sample = torch.Generator().manual_seed(o.seed)
    g_aug = torch.Generator().manual_seed(o.seed + 1_000_003)
    n_draw = steps * o.batch_size
    sampler: Sampler[int]
    if o.balance == "sampler":
        w = torch.tensor([1.0 / sp.counts[v] for v in sp.train_lv], dtype=torch.double)
        sampler = WeightedRandomSampler(w, num_samples=n_draw, replacement=True, generator=g_sample)  # type: ignore[arg-type]  # a tensor of weights is accepted
    else:
        sampler = RandomSampler(view, replacement=True, num_samples=n_draw, generator=g_sample)
    loader = DataLoader(view, batch_size=o.batch_size, sampler=sampler, num_workers=0 if o.cache else o.workers,
                        pin_memory=use_cuda, drop_last=False)
    warmup = min(100, steps // 10) if o.warmup is None else int(o.warmup)
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, warmup))
    return StepSetup(model=model, loader=loader, optimizer=opt, scheduler=sched, device=dev,
                     autocast=_autocast(use_cuda, o.amp), augment_generator=g_aug if o.augment else None,
                     jitter=o.jitter, lr=o.lr)


def _write(o: ClassifierTrainOptions, model: HER2Classifier, metrics: dict[str, Any], names: list[str], steps: int) -> None:
    """Checkpoint and JSON report beside it; adds their paths to ``metrics``."""
    assert o.out is not None
    rep_path = report_path(o.out)
    meta = {
        "levels": list(HER2_LEVELS[: o.n_levels]),
        "size": o.size,
        "seed": o.seed,
        "subset": o.subset,
        "train_images_hash": names_hash(names),
        **{k: metrics[k] for k in ("n_train", "train_counts", "accuracy", "balanced_accuracy", "confusion",
                                   "n_val", "val_source")},
        "steps": steps,
        "batch_size": o.batch_size,
        "lr": o.lr,
        "weight_decay": o.weight_decay,
        "balance": o.balance,
        "augment": o.augment,
        "jitter": o.jitter if o.augment else 0.0,
        "pretrained": Path(o.pretrained).name if o.pretrained else None,
        "derestainer_version": __version__,
        **(o.extra_meta or {}),
    }
    ckpt = save_classifier(o.out, model, meta)
    metrics["checkpoint"] = str(ckpt)
    metrics["report"] = str(rep_path)
    write_json(rep_path, {"kind": "classifier-report", "arch": o.arch, "n_levels": o.n_levels, **meta, **metrics})


def run_classifier_training(
    train_data: ItemSource, options: ClassifierTrainOptions | None = None, val_data: ItemSource | None = None,
) -> tuple[HER2Classifier, dict[str, Any]]:
    """Train a :class:`HER2Classifier` on the IHC images and levels of a paired dataset (see :func:`fit_classifier`)."""
    o = options or ClassifierTrainOptions()
    if o.out is not None:
        report_path(o.out)  # refuse a bad output path before training
    dev = resolve_device(o.device)
    t0 = time.time()
    sp = _split(train_data, val_data, o)
    names = dataset_names(train_data, sp.train_idx)
    steps = _n_steps(o, len(sp.train_idx))
    train_view = IHCView(train_data, sp.train_idx, sp.train_lv, o.size)
    val_view = IHCView(sp.val_base, sp.val_idx, sp.val_lv, o.size) if sp.val_base is not None and sp.val_idx else None
    if o.cache:
        train_view.fill_cache(o.workers, o.progress)
        if val_view is not None:
            val_view.fill_cache(o.workers, o.progress)
    setup = _setup(o, sp, train_view, steps, dev)
    model = setup.model
    ema_loss, ema_acc = run_steps(setup, steps, o.progress)
    if val_view is not None:
        scores = evaluate_classifier(model, val_view, batch_size=o.batch_size, device=dev, workers=0 if o.cache else o.workers)
    else:
        scores = classification_metrics(np.zeros((o.n_levels, o.n_levels), dtype=np.int64))
        scores["confusion"] = None
    metrics: dict[str, Any] = {
        **{k: scores[k] for k in ("accuracy", "balanced_accuracy", "per_level_recall", "confusion")},
        "n_val": len(sp.val_idx),
        "val_source": sp.val_source,
        "n_train": len(sp.train_idx),
        "train_counts": sp.counts.tolist(),
        "steps": steps,
        "final_loss": ema_loss,
        "final_train_accuracy": ema_acc,
        "seconds": round(time.time() - t0, 2),
    }
    model = model.to("cpu").to(memory_format=torch.contiguous_format)
    if o.out is not None:
        _write(o, model, metrics, names, steps)
    return model, metrics


def fit_classifier(
    train_data: ItemSource,
    *,
    val_data: ItemSource | None = None,
    **options: Any,
) -> tuple[HER2Classifier, dict[str, Any]]:
    """Train a :class:`HER2Classifier` on the IHC images and levels of a paired dataset.

    Args:
        train_data: a dataset of dicts with ``ihc`` (uint8 ``[3,H,W]``) and ``level`` (0..3, -1 unknown);
            a ``levels`` attribute (list of ints), when present, spares decoding every image to read labels,
            and a ``names`` attribute is used for the training-set hash.
        val_data: validation dataset (e.g. the BCI test split); None → ``val_fraction`` of the training
            images held out, stratified by level (``val_fraction=0`` → no validation).
        options: the fields of :class:`ClassifierTrainOptions` as keywords (``arch``, ``size``, ``steps``, ...).

    Returns:
        ``(model in eval mode, metrics)``; metrics hold ``accuracy``, ``balanced_accuracy``,
        ``per_level_recall``, ``confusion`` (``[n_levels][n_levels]``, rows true), ``n_val``, ``n_train``,
        ``train_counts``, ``steps``, ``final_loss``, ``seconds`` and, when written, ``checkpoint`` and ``report``.

    Raises:
        ClassifierDataError: no usable labels, fewer than two levels, or an empty set.
        ValueError: bad arguments.
    """
    unknown = sorted(set(options) - {f.name for f in fields(ClassifierTrainOptions)})
    if unknown:
        raise TypeError(f"fit_classifier() got unexpected keyword argument(s) {', '.join(unknown)}")
    return run_classifier_training(train_data, ClassifierTrainOptions(**options), val_data)


def train_classifier(train_data: ItemSource, **kwargs: Any) -> dict[str, Any]:
    """:func:`fit_classifier` returning only the metrics dict (the model is in the checkpoint at ``out``)."""
    return fit_classifier(train_data, **kwargs)[1]


__all__ = [
    "BALANCES",
    "DEFAULT_STEPS",
    "Amp",
    "Balance",
    "ClassifierTrainOptions",
    "fit_classifier",
    "report_path",
    "run_classifier_training",
    "train_classifier",
]

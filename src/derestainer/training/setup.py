"""What the translation trainer is built from: models, the frozen comparator, optimizers and data."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from derestainer.core.config import Config
from derestainer.core.errors import DatasetError, TrainingError
from derestainer.data.datasets import PairedImageDataset, build_dataset, check_headers
from derestainer.models.classifier import HER2Classifier, freeze, load_classifier
from derestainer.models.discriminator import build_discriminator
from derestainer.models.registry import create_generator
from derestainer.training.classifier_data import stratified_split
from derestainer.training.distributed import mix_seed, worker_init_fn
from derestainer.training.resume import reshard_warning
from derestainer.training.sampling import EpochSampler, SeededPairs
from derestainer.training.step import make_adamw

if TYPE_CHECKING:
    from derestainer.training.loop import Trainer

#: The run-folder file listing the training files held out for validation (one name per line).
VAL_FILES = "val_files.txt"


def build_models(cfg: Config, active: frozenset[str] | set[str], device: torch.device,
                 channels_last: bool) -> tuple[nn.Module, nn.Module | None]:
    """``(generator, discriminator)`` on ``device``; no discriminator when neither the GAN term nor feature matching is on.

    Seeded by the caller, so identical on every rank (DDP also broadcasts rank 0's weights).
    """
    generator = create_generator(cfg.model).to(device)
    # D is trained when a term reads it: the GAN term, or feature matching alone
    discriminator = build_discriminator(cfg.model).to(device) if {"gan", "fm"} & set(active) else None
    if channels_last:
        generator.to(memory_format=torch.channels_last)
        if discriminator is not None:
            discriminator.to(memory_format=torch.channels_last)
    return generator, discriminator


def has_unused_parameters(generator: nn.Module, active: set[str] | frozenset[str], loss_cfg: Any) -> bool:
    """Whether some generator parameters get no gradient in this run (DDP's ``find_unused_parameters``).

    A generator whose parts are trained only by some terms says which with
    ``unused_parameters(active, loss_cfg)`` (f_H, the SimSiam predictor, a level or low-resolution
    head, PatchNCE heads); one without that method has none.
    """
    fn = getattr(generator, "unused_parameters", None)
    return bool(fn(frozenset(active), loss_cfg)) if callable(fn) else False


def stain_matrix(generator: nn.Module) -> torch.Tensor | None:
    """The generator's fixed stain matrix (``destainer.separation.rgb_from_hed``), if it has one."""
    sep = getattr(getattr(generator, "destainer", None), "separation", None)
    m = getattr(sep, "rgb_from_hed", None)
    return m if isinstance(m, torch.Tensor) else None


def load_comparator(path: str, device: torch.device, channels_last: bool) -> tuple[HER2Classifier, int | None]:
    """The frozen comparator C of L_cmp and its input size (None: the images' own size)."""
    model, meta = load_classifier(path, device=device)
    freeze(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    size = meta.get("size")
    return model, int(size) if isinstance(size, int) and size > 0 else None


def make_optimizers(cfg: Config, generator: nn.Module,
                    discriminator: nn.Module | None) -> tuple[torch.optim.AdamW, torch.optim.AdamW | None]:
    """AdamW for G (``train.lr``) and D (``train.d_lr``, default ``train.lr``)."""
    tc = cfg.train
    b1, b2 = tc.betas
    betas = (float(b1), float(b2))
    opt_g = make_adamw(list(generator.parameters()), tc.lr, betas, tc.weight_decay)
    opt_d = (make_adamw(list(discriminator.parameters()), tc.d_lr or tc.lr, betas, tc.weight_decay)
             if discriminator is not None else None)
    return opt_g, opt_d


def holdout_split(data: PairedImageDataset, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Positions ``(train, held_out)`` of ``data``: ``round(fraction · n)`` of its ``n`` files held out.

    The files are ordered by name first (so the split does not depend on the listing order), then
    split by the classifier's own hold-out, :func:`~derestainer.training.classifier_data.stratified_split`,
    with one stratum (a seeded permutation; at least one file held out, and one kept, when
    ``fraction > 0`` and ``n ≥ 2``). Not stratified by level: that keeps one file of every level,
    half of a tiny training set.
    """
    if fraction <= 0 or len(data) < 2:
        return list(range(len(data))), []
    order = sorted(range(len(data)), key=lambda i: data.names[i])
    keep, held = stratified_split([0] * len(order), fraction, seed)
    return sorted(order[k] for k in keep), sorted(order[k] for k in held)


def _is_test_split(layout: str, split: str) -> bool:
    return split == "test" or (layout == "mist" and split == "val")  # MIST's val is its test set


def validation_split(tr: Trainer, base: PairedImageDataset) -> tuple[PairedImageDataset, Dataset | None, list[str] | None]:
    """``(training set, validation set, held-out file names)`` by ``data.val_split`` / ``data.val_fraction``.

    ``val_split: ""`` holds out ``val_fraction`` of the training files (:func:`holdout_split`,
    seeded by ``data.val_seed``): deterministic from the config, so a resumed run gets the same
    split. An explicit ``val_split`` uses that split and ignores ``val_fraction``; naming the test
    split is warned about (model selection on it biases the test numbers).
    """
    dc = tr.cfg.data
    if not dc.val_split:
        keep, held = holdout_split(base, dc.val_fraction, dc.val_seed)
        if not held:
            tr.warn(f"data.val_fraction={dc.val_fraction:g} holds out no file of {len(base)}; validation is off")
            return base, None, None
        return base.subset(keep), base.subset(held), [base.names[i] for i in held]
    if _is_test_split(dc.layout, dc.val_split):
        tr.warn(f"data.val_split={dc.val_split!r} is the test split: choosing `best` and the samples on it biases "
                f"the test numbers; use data.val_split='' to hold out data.val_fraction of the training files")
    try:
        val_set: Dataset | None = build_dataset(dc, dc.val_split, train=False)
    except (DatasetError, ValueError) as exc:
        tr.warn(f"no held-out split '{dc.val_split}' ({exc}); validation is off")
        return base, None, None
    return base, (val_set if len(val_set) > 0 else None), None  # type: ignore[arg-type]


def build_data(tr: Trainer) -> None:
    """``tr.train_set`` / ``sampler`` / ``batches_per_epoch`` / ``val_set`` / ``val_files`` / ``sample_items``."""
    dc, tc, env = tr.cfg.data, tr.cfg.train, tr.env
    # The dataset only decodes and resizes; SeededPairs draws the augmentation (see training.loop).
    base = build_dataset(replace(dc, crop=0, flip=False, rot90=False), dc.train_split, train=False)
    check_headers(base)  # every header and pair size checked before anything is written
    base, val_set, tr.val_files = validation_split(tr, base)
    tr.train_set = SeededPairs(base, tc.seed, crop=dc.crop, flip=dc.flip, rot90=dc.rot90)
    tr.sampler = EpochSampler(len(base), env.rank, env.world_size, tc.seed)
    tr.batches_per_epoch = tr.sampler.per_rank // tc.batch_size
    if tr.batches_per_epoch < 1:
        held = f" once {len(tr.val_files)} are held out for validation (data.val_fraction)" if tr.val_files else ""
        raise TrainingError(
            f"the training split has {len(base)} pairs{held}: too few for batch_size {tc.batch_size} "
            f"on {env.world_size} rank(s); lower train.batch_size{' or data.val_fraction' if held else ''}")
    if tr.resharded is not None:
        tr.warn(reshard_warning(tr.resharded, env.world_size, len(base), tc.batch_size))
    tr.val_set = val_set
    src = val_set if val_set is not None else base
    n = min(tc.sample_count, len(src))  # type: ignore[arg-type]
    tr.sample_items = [src[i] for i in range(n)] if env.is_main and n > 0 else []


def data_folders(tr: Trainer) -> list[Path]:
    """The folders the run reads images from (training and validation splits), and its label CSV."""
    folders: set[Path] = set()
    for ds in (getattr(tr.train_set, "base", None), tr.val_set):
        for pair in getattr(ds, "pairs", ()):
            folders.update(Path(f).parent for f in pair[1:])
    levels = [Path(tr.cfg.data.levels)] if tr.cfg.data.levels else []
    return sorted(folders) + levels


def make_loader(tr: Trainer) -> DataLoader:
    """The one training loader of a run (its worker processes persist across epochs)."""
    dc, tc = tr.cfg.data, tr.cfg.train
    return DataLoader(
        tr.train_set, batch_size=tc.batch_size, sampler=tr.sampler, drop_last=True,
        num_workers=dc.workers, pin_memory=tr.device.type == "cuda",
        worker_init_fn=worker_init_fn if dc.workers > 0 else None, persistent_workers=dc.workers > 0,
        generator=torch.Generator().manual_seed(mix_seed(tc.seed, tr.env.rank)),
    )

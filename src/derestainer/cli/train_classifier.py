"""``derestainer train-classifier``: the HER2 IHC classifier used as comparator C and as evaluator."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import click

from derestainer.cli.common import fail
from derestainer.core.errors import DerestainerError

if TYPE_CHECKING:
    from derestainer.data.datasets import PairedImageDataset
    from derestainer.models.classifier import ClassifierArch
    from derestainer.training.classifier import Balance
    from derestainer.training.classifier_data import Subset

#: Dataset layouts the command reads.
Layout = Literal["bci", "mist", "folders"]


@click.command("train-classifier", short_help="Train the HER2 IHC classifier (comparator C / evaluator).")
@click.option("--data", "data_root", required=True, type=click.Path(path_type=Path),
              help="Dataset root (BCI: ROOT/IHC/{train,test}/NNNNN_{split}_{level}.png).")
@click.option("--layout", type=click.Choice(["bci", "mist", "folders"]), default="bci", show_default=True,
              help="How the data is laid out; MIST has no HER2 levels and is refused.")
@click.option("--he-dir", default="HE/{split}", show_default=True,
              help="layout=folders: H&E folder, relative to --data, may contain {split}.")
@click.option("--ihc-dir", default="IHC/{split}", show_default=True,
              help="layout=folders: IHC folder, relative to --data, may contain {split}.")
@click.option("--levels", "levels_csv", type=click.Path(path_type=Path), default=None,
              help="layout=folders: CSV 'name,level' (default: levels from BCI-style names).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Checkpoint to write (.safetensors); a JSON report is written beside it.")
@click.option("--arch", type=click.Choice(["resnet50", "resnet18", "tiny"]), default="resnet50", show_default=True)
@click.option("--size", type=int, default=256, show_default=True, help="Images are resized to SIZE×SIZE.")
@click.option("--steps", type=int, default=None, help="Optimisation steps (default 2000 unless --epochs).")
@click.option("--epochs", type=float, default=None, help="Passes over the training images instead of --steps.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=3e-4, show_default=True, help="AdamW learning rate (warm-up, cosine decay).")
@click.option("--weight-decay", type=float, default=1e-2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True,
              help="Use different seeds for the comparator and the evaluator.")
@click.option("--subset", type=click.Choice(["all", "even", "odd"]), default="all", show_default=True,
              help="Training images by index: even/odd give two disjoint sets (comparator vs evaluator).")
@click.option("--train-split", default="train", show_default=True)
@click.option("--val-split", default="test", show_default=True,
              help="Split to validate on; 'none' holds out --val-fraction of the training images instead.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True)
@click.option("--balance", type=click.Choice(["sampler", "none"]), default="sampler", show_default=True,
              help="Class-balanced sampling, or uniform sampling.")
@click.option("--augment/--no-augment", default=True, show_default=True,
              help="Flips, 90° rotations and a small colour jitter.")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="Decode and resize every image once and keep it in memory (3·SIZE² bytes each).")
@click.option("--workers", type=int, default=None, help="Image decoding processes (default: up to 4).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--pretrained", type=click.Path(path_type=Path), default=None,
              help="LOCAL ImageNet weights of the ResNet, a .safetensors file (convert a .pth once with scripts/convert_weights.py); never downloaded.")
def train_classifier(
    data_root: Path, layout: Layout, he_dir: str, ihc_dir: str, levels_csv: Path | None, out: Path, arch: ClassifierArch,
    size: int, steps: int | None, epochs: float | None, batch_size: int, lr: float, weight_decay: float,
    seed: int, subset: Subset, train_split: str, val_split: str, val_fraction: float, balance: Balance,
    augment: bool, cache: bool, workers: int | None, device: str, pretrained: Path | None,
) -> None:
    """Train a HER2 level classifier (0, 1+, 2+, 3+) on IHC images, class-balanced, and report
    accuracy and the confusion matrix on the validation split.

    The comparator C of L_cmp and the evaluator of the semantic metrics are two runs of this command,
    kept independent: another --seed and, where data allows, --subset even / --subset odd.
    """
    from derestainer.core.guard import output_lock, refuse_overlap
    from derestainer.data.datasets import BCIDataset, MISTDataset, PairedFolderDataset

    if steps is not None and epochs is not None:
        raise fail("give --steps or --epochs, not both")
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    held_out = val_split.lower() in ("none", "")

    def open_split(split: str) -> PairedImageDataset:
        if layout == "bci":
            return BCIDataset(data_root, split)
        if layout == "mist":
            return MISTDataset(data_root, split)
        dirs = [data_root / d.replace("{split}", split) for d in (he_dir, ihc_dir)]
        return PairedFolderDataset(dirs[0], dirs[1], levels=levels_csv)

    if layout == "mist":
        raise fail("MIST has no per-image HER2 level, so a HER2 classifier cannot be trained on it; "
                   "use BCI, or --layout folders with --levels CSV")
    if layout == "folders" and not held_out and "{split}" not in he_dir + ihc_dir:
        # Without {split} the "validation split" would be the training images themselves.
        click.echo("--he-dir/--ihc-dir have no {split}: validating on a held-out fraction of the images", err=True)
        held_out = True
    report = out.with_suffix(".json")
    refuse_overlap([p for p in (levels_csv, pretrained) if p is not None], out_files=[out, report])
    try:
        with output_lock(out, folder=False):  # taken first: an unwritable --out fails before training
            m = _fit(open_split, train_split, val_split, held_out, dict(
                arch=arch, size=size, steps=steps, epochs=epochs, batch_size=batch_size, lr=lr,
                weight_decay=weight_decay, seed=seed, val_fraction=val_fraction if held_out else 0.0,
                subset=subset, out=out, device=device, pretrained=pretrained, balance=balance, augment=augment,
                cache=cache, workers=workers, progress=True,
                extra_meta={"data": data_root.name, "layout": layout, "train_split": train_split,
                            "val_split": None if held_out else val_split},
                val_name=None if held_out else f"split {val_split}", log=lambda msg: click.echo(msg, err=True)))
    except DerestainerError:
        raise  # the CLI group reports these
    except (ValueError, FloatingPointError) as exc:  # bad option values, a diverging run: user errors too
        raise fail(str(exc)) from None
    _report(m, arch)


def _fit(open_split: Callable[[str], PairedImageDataset], train_split: str, val_split: str, held_out: bool,
         kwargs: dict[str, Any]) -> dict[str, Any]:
    from derestainer.training.classifier import fit_classifier

    train_ds = open_split(train_split)
    val_ds = None if held_out else open_split(val_split)
    _, m = fit_classifier(train_ds, val_data=val_ds, **kwargs)
    return m


def _report(m: dict[str, Any], arch: str) -> None:
    from derestainer.training.classifier_metrics import format_confusion

    click.echo(f"trained {arch} on {m['n_train']} images {m['train_counts']} for {m['steps']} steps "
               f"in {m['seconds']:.0f} s")
    if m["confusion"] is None:
        click.echo("no validation images: accuracy not measured")
    else:
        click.echo(f"validation ({m['val_source']}, {m['n_val']} images): accuracy {m['accuracy']:.4f}, "
                   f"balanced accuracy {m['balanced_accuracy']:.4f}")
        click.echo(format_confusion(m["confusion"]))
    click.echo(f"checkpoint: {m['checkpoint']}")
    click.echo(f"report:     {m['report']}")

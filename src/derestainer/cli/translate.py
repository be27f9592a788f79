"""``derestainer translate``: H&E images or folders → virtual IHC images + predicted HER2 level."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from derestainer.cli.common import fail, inference_options

if TYPE_CHECKING:
    from derestainer.inference.precision import Precision


@click.command(short_help="Translate H&E images or folders into virtual IHC.")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--checkpoint", "-m", "checkpoint", required=True, type=click.Path(path_type=Path),
              help="Exported model file, training checkpoint folder, or run folder.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Images per batch (images of equal size are batched together).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N | mps.")
@click.option("--tta", is_flag=True, help="Test-time augmentation: average the 8 flips/rotations (8× slower).")
@click.option("--recursive/--no-recursive", default=True, show_default=True,
              help="Descend into sub-folders of folder inputs (the folder structure is mirrored).")
@click.option("--mpp", "input_mpp", type=float, default=None,
              help="Microns per pixel of the inputs: resize to the model's training resolution and back. "
                   "Default: inputs are taken to be at the training resolution.")
@inference_options
def translate(inputs: tuple[Path, ...], checkpoint: Path, out_dir: Path, batch_size: int, device: str, tta: bool,
              recursive: bool, input_mpp: float | None, precision: Precision, fast: bool) -> None:
    """Translate INPUTS (images and/or folders) into virtual IHC PNGs of the same size in --out.

    Also writes OUT/predictions.csv and OUT/predictions.json: the predicted HER2 level and the
    probability of each level per image (empty for models without a level head).
    """
    from tqdm.auto import tqdm

    from derestainer.core.guard import refuse_overlap
    from derestainer.core.io import check_images
    from derestainer.inference.folders import PREDICTION_FILES, collect_inputs, translate_files
    from derestainer.inference.loading import load_model

    try:
        jobs = collect_inputs(inputs, recursive=recursive)
    except (FileNotFoundError, ValueError) as exc:  # a missing input, clashing outputs, no images
        raise fail(str(exc)) from None
    # before any work: no output may be an input, nor land where the inputs are listed
    refuse_overlap(inputs, out_files=[out_dir / j.rel for j in jobs] + [out_dir / f for f in PREDICTION_FILES],
                   out_dirs=[out_dir], recursive=recursive)
    lm = load_model(checkpoint, device, fast=fast, precision=precision)
    check_images([j.src for j in jobs])  # every header checked before the first output is written
    with tqdm(total=len(jobs), unit="img", desc="translate") as bar:
        rows = translate_files(lm, jobs, out_dir, batch_size=batch_size, tta=tta, input_mpp=input_mpp,
                               precision=precision, progress=bar.update)
    click.echo(f"{len(rows)} images → {out_dir} (predictions.csv, predictions.json); model {lm.path} on {lm.device}")

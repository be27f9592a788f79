"""``derestainer translate``: H&E images or folders → virtual IHC images + predicted HER2 level."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from derestainer.cli.common import fail, inference_options

if TYPE_CHECKING:
    from derestainer.inference.folders import Job
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
@click.option("--input-mpp", "--mpp", "input_mpp", type=float, default=None,
              help="Microns per pixel of the inputs: resize to the model's training resolution and back "
                   "(--mpp: the same). Default: inputs are taken to be at the training resolution.")
@click.option("--output-size", type=click.Choice(["input", "model"]), default="input", show_default=True,
              help="Write each output at its input's size, or at the model's working size (e.g. 512 px for a 1024 px "
                   "BCI tile with --mpp; `evaluate` then resizes it, with the same filter).")
@click.option("--resize-filter", type=click.Choice(["bicubic", "bilinear", "lanczos", "box", "nearest"]), default="bicubic",
              show_default=True, help="PIL filter bringing the output back to the input's size (the evaluation protocol's).")
@inference_options
def translate(inputs: tuple[Path, ...], checkpoint: Path, out_dir: Path, batch_size: int, device: str, tta: bool,
              recursive: bool, input_mpp: float | None, output_size: str, resize_filter: str, precision: Precision,
              fast: bool) -> None:
    """Translate INPUTS (images and/or folders) into virtual IHC PNGs in --out (the
    inputs' size; --output-size model: the model's working size).

    Without --mpp the inputs are taken to be at the model's training µm/px; an input 1.5 times the
    model's training size or more gets a warning (a 1024 px BCI tile for a model trained at 512 px
    needs --mpp). Also writes OUT/predictions.csv and OUT/predictions.json: the predicted HER2 level and the
    probability of each level per image (empty for models without a level head). Whole slides
    (SVS, NDPI, MRXS, pyramidal TIFF, …) are refused: `translate-slide` reads them tile by tile.
    """
    from tqdm.auto import tqdm

    from derestainer.core.guard import refuse_overlap
    from derestainer.core.io import IMAGE_SUFFIXES, check_images
    from derestainer.inference.folders import PREDICTION_FILES, collect_inputs, translate_files
    from derestainer.inference.loading import load_model
    from derestainer.inference.slide_jobs import refuse_whole_slides

    if out_dir.suffix.lower() in IMAGE_SUFFIXES and not out_dir.is_dir():
        raise fail(f"--out {out_dir}: a folder is expected (one PNG per input is written there, with "
                   "predictions.csv); give a folder name")
    try:
        jobs = collect_inputs(inputs, recursive=recursive)
    except (FileNotFoundError, ValueError) as exc:  # a missing input, clashing outputs, no images
        raise fail(str(exc)) from None
    # an SVS/NDPI/MRXS/pyramidal TIFF would be decoded whole (all of level 0) into one PNG
    refuse_whole_slides([j.src for j in jobs])
    # before any work: no output may be an input, nor land where the inputs are listed
    refuse_overlap(inputs, out_files=[out_dir / j.rel for j in jobs] + [out_dir / f for f in PREDICTION_FILES],
                   out_dirs=[out_dir], recursive=recursive)
    lm = load_model(checkpoint, device, fast=fast, precision=precision)
    sizes = check_images([j.src for j in jobs])  # every header checked before the first output is written
    if input_mpp is None:
        _warn_scale(jobs, sizes, lm.size, lm.mpp)
    with tqdm(total=len(jobs), unit="img", desc="translate") as bar:
        rows = translate_files(lm, jobs, out_dir, batch_size=batch_size, tta=tta, input_mpp=input_mpp,
                               precision=precision, output_size=output_size, resize_filter=resize_filter,
                               progress=bar.update)
    click.echo(f"{len(rows)} images → {out_dir} (predictions.csv, predictions.json); model {lm.path} on {lm.device}")


#: An input this many times the model's training size, translated without ``--mpp``, gets a warning.
SCALE_WARNING: float = 1.5


def _warn_scale(jobs: list[Job], sizes: list[tuple[int, int]], train_size: int, mpp: float) -> None:
    """Warn (once, naming the first) when inputs look like another scale than the model's training one."""
    big = [j.src for j, (w, h) in zip(jobs, sizes, strict=True) if max(w, h) >= SCALE_WARNING * train_size]
    if big:
        click.echo(f"warning: {len(big)} input(s), e.g. {big[0]}, are at least {SCALE_WARNING:g}x the model's training "
                   f"size ({train_size} px at {mpp:g} µm/px) and no --mpp was given: they are translated as if at "
                   f"{mpp:g} µm/px. For 1024 px BCI tiles (0.46 µm/px) pass --mpp 0.46.", err=True)

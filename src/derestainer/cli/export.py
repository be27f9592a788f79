"""``derestainer export``: one self-describing safetensors model file from a training checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from derestainer.cli.common import fail


@click.command(short_help="Export a checkpoint's generator as one model file.")
@click.option("--checkpoint", "-m", "checkpoint", required=True, type=click.Path(path_type=Path),
              help="Run folder, checkpoint folder, or generator .safetensors file.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Model file to write (.safetensors).")
@click.option("--training-mpp", "--mpp", "mpp", type=float, default=None,
              help="Microns per pixel of the training images at training size (overrides the config's data.mpp; "
                   "--mpp: the same).")
@click.option("--stain-reference", "stain_reference", default="auto", show_default=True, metavar="FOLDER|auto|none",
              help="Record the training H&E's stain (Macenko vectors and amounts, L*a*b* statistics), the target of "
                   "translate-slide --normalize: from a folder of training H&E images; auto: the config's training "
                   "split where it is on this machine; none: record none.")
def export(checkpoint: Path, out: Path, mpp: float | None, stain_reference: str) -> None:
    """Write the generator with its config and training resolution (size, µm/px) in the metadata.

    The file loads without unpickling anything (derestainer.models.files.load_generator) and is
    what `derestainer translate` and `translate-slide` take as --checkpoint.
    """
    from derestainer.inference.loading import export_model

    if mpp is not None and mpp <= 0:
        raise fail(f"--training-mpp/--mpp must be positive, got {mpp}")
    meta = export_model(checkpoint, out, mpp=mpp, stain_reference=stain_reference)
    ref = meta.get("stain_reference")
    stain = (f"; training stain from {ref['source']}" + ("" if ref.get("macenko") else " (L*a*b* only: no Macenko fit)")
             if isinstance(ref, dict) else "; no training stain recorded (--normalize reinhard will be refused)")
    click.echo(f"{out}: {meta['model']} generator, trained at {meta['size']} px, {meta['mpp']:g} µm/px{stain}")

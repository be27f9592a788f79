"""``derestainer separate``: stain channel images and a panel per input image."""

from __future__ import annotations

from pathlib import Path

import click

from derestainer.cli.common import fail


@click.command(short_help="Split images into H, E and DAB channel images.")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--second", type=click.Choice(["auto", "e", "dab"]), default="auto", show_default=True,
              help="Second stain in the panel: E for H&E, DAB for IHC; auto picks the stronger one.")
@click.option("--stain-matrix", "matrix", type=click.Choice(["ruifrok", "macenko"]), default="ruifrok",
              show_default=True, help="Ruifrok's fixed vectors, or per-image Macenko estimation.")
def separate(images: tuple[Path, ...], out_dir: Path, second: str, matrix: str) -> None:
    """Write H, E and DAB channel images and an original|H|E-or-DAB panel (paper Fig. 1b) per image."""
    from derestainer.core.guard import output_lock, refuse_overlap
    from derestainer.core.io import check_images, read_image
    from derestainer.stain.panels import PANEL_FILES, separate_image

    refuse_overlap(images, out_files=[out_dir / f"{p.stem}_{k}.png" for p in images for k in PANEL_FILES],
                   out_dirs=[out_dir])
    check_images(images)  # every input checked before the first output is written
    with output_lock(out_dir, folder=True):
        for path in images:
            rgb = read_image(path)  # an unreadable image is an ImageReadError: one line, via the CLI group
            try:
                written = separate_image(rgb, out_dir, path.stem, second=second, matrix=matrix)
            except ValueError as exc:
                raise fail(f"{path}: {exc}") from None
            click.echo(f"{path}: {', '.join(str(w) for w in written)}")

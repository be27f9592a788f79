"""``derestainer translate-slide``: whole slides → pyramidal OME-TIFF of virtual IHC + heat map + summary."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from derestainer.cli.common import fail, inference_options

if TYPE_CHECKING:
    from derestainer.inference.ometiff import Compression, Layout
    from derestainer.inference.precision import Precision


@click.command("translate-slide", short_help="Translate whole slides into pyramidal OME-TIFFs.")
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--checkpoint", "-m", "checkpoint", required=True, type=click.Path(path_type=Path),
              help="Exported model file, training checkpoint folder, or run folder.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="OUT.ome.tiff for one slide, or a folder (one SLIDE_NAME.ome.tiff per slide).")
@click.option("--mpp", "slide_mpp", type=float, default=None,
              help="Microns per pixel of the slides' level 0 (overrides the slide metadata; required where it is missing).")
@click.option("--tile", default=512, show_default=True, type=click.IntRange(min=16), help="Model tile side (px).")
@click.option("--overlap", default=64, show_default=True, type=click.IntRange(min=0),
              help="Overlap between neighbouring tiles (px); blended with a raised-cosine window.")
@click.option("--margin", default=-1, show_default=True, type=int,
              help="Pixels at inner tile edges given zero weight (-1: overlap/4).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Tiles per batch.")
@click.option("--compression", type=click.Choice(["jpeg", "lossless"]), default="jpeg", show_default=True,
              help="jpeg (quality --quality) or lossless (Deflate).")
@click.option("--quality", default=90, show_default=True, type=click.IntRange(1, 100), help="JPEG quality.")
@click.option("--layout", type=click.Choice(["ome", "openslide"]), default="ome", show_default=True,
              help="ome: OME-TIFF with SubIFD pyramid (QuPath, Bio-Formats, tiffslide); openslide: plain "
                   "pyramidal TIFF whose every level OpenSlide sees.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its work folder.")
@click.option("--keep-work", is_flag=True, help="Keep the work folder (finished bands) after success.")
@click.option("--all-tiles", is_flag=True, help="Run every tile (no tissue mask).")
@click.option("--min-tissue", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Run a tile when more than this fraction of it is tissue.")
@click.option("--level-threshold", default=0.10, show_default=True, type=click.FloatRange(0, 1),
              help="Slide level = highest k with more than this fraction of tissue tiles at level ≥ k.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N | mps.")
@inference_options
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1), help="Tile-reading threads.")
@click.option("--recursive", is_flag=True, help="Search folder inputs recursively for slides.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def translate_slide(slides: tuple[Path, ...], checkpoint: Path, out: Path, slide_mpp: float | None, tile: int,
                    overlap: int, margin: int, batch_size: int, compression: Compression, quality: int, layout: Layout,
                    resume: bool, keep_work: bool, all_tiles: bool, min_tissue: float, level_threshold: float,
                    device: str, precision: Precision, fast: bool, workers: int, recursive: bool, quiet: bool) -> None:
    """Translate SLIDES (files or folders: SVS, NDPI, MRXS, TIFF, OME-TIFF, PNG, …) into virtual IHC.

    Output per slide: NAME.ome.tiff (tiled, pyramidal, at the model's training µm/px, with the
    physical pixel size), NAME.heatmap.png, NAME.tiles.csv (per-tile HER2 probabilities) and
    NAME.summary.json. Under torchrun, slide i goes to rank i % WORLD_SIZE.
    """
    from derestainer.core.guard import refuse_overlap
    from derestainer.inference.loading import load_model
    from derestainer.inference.slide_jobs import dist_rank_world, list_slides, output_for, shard
    from derestainer.inference.slide_options import SlideOptions
    from derestainer.inference.slide_outputs import SlideOutputs
    from derestainer.inference.wsi import translate_slide as run_slide

    if slide_mpp is not None and slide_mpp <= 0:
        raise fail(f"--mpp must be positive, got {slide_mpp}")
    paths = list_slides(slides, recursive=recursive)
    outs = output_for(paths, out)
    # before any work: no output may be, or sit among, the input slides
    refuse_overlap([*slides, *paths], out_files=[f for o in outs for f in SlideOutputs.for_tiff(o).files()],
                   out_dirs=[] if len(outs) == 1 and outs[0] == out else [out], recursive=recursive)
    rank, world = dist_rank_world()
    mine = shard(list(zip(paths, outs)), rank, world)
    lm = load_model(checkpoint, device, fast=fast, precision=precision)
    opts = SlideOptions(tile=tile, overlap=overlap, margin=margin, batch_size=batch_size, compression=compression,
                        quality=quality, layout=layout, slide_mpp=slide_mpp, resume=resume, keep_work=keep_work,
                        all_tiles=all_tiles, min_tissue=min_tissue, level_threshold=level_threshold,
                        precision=precision, progress=not quiet, workers=workers)
    for slide, dst in mine:
        s = run_slide(lm, slide, dst, opts)
        for warning in s.get("warnings", []):
            click.echo(f"warning: {slide}: {warning}", err=True)
        level = f", slide level {s['predicted_level']}" if s.get("predicted_level") is not None else ""
        rate = f", {s['tiles_per_second']:.1f} tiles/s" if s.get("tiles_per_second") else ""
        click.echo(f"{slide} → {dst} ({s['output_size'][0]}×{s['output_size'][1]} px at {s['model_mpp']:g} µm/px, "
                   f"{s['tiles']['run']}/{s['tiles']['total']} tiles{rate}{level})")

"""``derestainer translate-slide``: whole slides → pyramidal OME-TIFF of virtual IHC + heat map + summary."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from derestainer.cli.common import fail, inference_options

if TYPE_CHECKING:
    from derestainer.inference.geometry import Geometry
    from derestainer.inference.ometiff import Compression, Layout
    from derestainer.inference.precision import Precision
    from derestainer.inference.slide_jobs import SlideRow
    from derestainer.stain.normalize import NormalizeMethod


@click.command("translate-slide", short_help="Translate whole slides into pyramidal OME-TIFFs.")
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--checkpoint", "-m", "checkpoint", required=True, type=click.Path(path_type=Path),
              help="Exported model file, training checkpoint folder, or run folder.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="OUT.ome.tiff (or OUT.tiff) for one slide, or a folder: one SLIDE_NAME.ome.tiff per slide "
                   "(SLIDE_NAME.tiff with --layout openslide) and slides.csv.")
@click.option("--slide-mpp", "--mpp", "slide_mpp", type=float, default=None,
              help="Microns per pixel of level 0 for EVERY slide, overriding what the slides' metadata say "
                   "(--mpp: the same).")
@click.option("--default-mpp", "default_mpp", type=float, default=None,
              help="Microns per pixel of level 0 for the slides whose metadata state none (others keep theirs).")
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
@click.option("--geometry", type=click.Choice(["native", "model"]), default="native", show_default=True,
              help="native: the virtual IHC at the slide's own level-0 size and µm/px (overlays the H&E, e.g. in "
                   "QuPath); model: at the model's training µm/px (smaller, faster).")
@click.option("--resume", is_flag=True, help="Continue interrupted slides from their work folders.")
@click.option("--overwrite", is_flag=True,
              help="Redo slides whose outputs are complete (default: skip them); old outputs are replaced atomically.")
@click.option("--keep-work", is_flag=True, help="Keep the work folder (finished bands) after success.")
@click.option("--all-tiles", is_flag=True, help="Run every tile (no tissue mask).")
@click.option("--min-tissue", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Run a tile when more than this fraction of it is tissue.")
@click.option("--level-threshold", default=0.10, show_default=True, type=click.FloatRange(0, 1),
              help="Slide level = highest k with more than this fraction of tissue tiles at level ≥ k.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N | mps.")
@inference_options
@click.option("--normalize", "normalize", type=click.Choice(["none", "macenko", "reinhard"]), default="none",
              show_default=True, help="Stain normalisation of the H&E before the model, fitted per slide on its "
                                      "thumbnail's tissue: macenko maps the slide's H and E colours to the model's "
                                      "stain matrix; reinhard needs colour statistics no model file records.")
@click.option("--map-mpp", "map_mpp", type=float, default=None,
              help="µm per cell of NAME.her2.ome.tiff (default: the tile stride). The model gives one value per "
                   "tile: a finer map resamples them; a smaller --tile or larger --overlap gives more values.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1), help="Tile-reading threads.")
@click.option("--recursive", is_flag=True, help="Search folder inputs recursively for slides.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def translate_slide(slides: tuple[Path, ...], checkpoint: Path, out: Path, slide_mpp: float | None,
                    default_mpp: float | None, tile: int, overlap: int, margin: int, batch_size: int,
                    compression: Compression, quality: int, layout: Layout, geometry: Geometry, resume: bool, overwrite: bool,
                    keep_work: bool, all_tiles: bool, min_tissue: float, level_threshold: float, device: str,
                    precision: Precision, fast: bool, normalize: NormalizeMethod, map_mpp: float | None, workers: int,
                    recursive: bool, quiet: bool) -> None:
    """Translate SLIDES (files or folders: SVS, NDPI, MRXS, TIFF, OME-TIFF, PNG, …) into virtual IHC.

    Output per slide: NAME.ome.tiff (tiled, pyramidal, at the slide's own size and µm/px or, with
    --geometry model, at the model's training µm/px, with the physical pixel size; NAME.tiff with --layout openslide), NAME.heatmap.png, NAME.tiles.csv
    (per-tile HER2 probabilities, level-0 and model pixels), NAME.her2.geojson (tiles for QuPath),
    NAME.her2.ome.tiff (probability map registered to the slide) and NAME.summary.json. A folder --out also gets slides.csv: one
    row per slide (done, skipped or failed). A slide that fails is reported and the others go on;
    the exit status is then 1. Slides already done are skipped unless --overwrite. Under torchrun,
    slide i goes to rank i % WORLD_SIZE, and each rank writes slides.rankR.csv.
    """
    from derestainer.core.guard import refuse_overlap
    from derestainer.inference.loading import load_model
    from derestainer.inference.normalize import check_normalize
    from derestainer.inference.slide_jobs import (
        BatchOptions,
        dist_rank_world,
        list_slides,
        output_for,
        run_batch,
        shard,
        slides_csv_path,
    )
    from derestainer.inference.slide_options import SlideOptions
    from derestainer.inference.slide_outputs import SlideOutputs

    for name, value in (("--slide-mpp/--mpp", slide_mpp), ("--default-mpp", default_mpp), ("--map-mpp", map_mpp)):
        if value is not None and not value > 0:
            raise fail(f"{name} must be positive, got {value}")
    paths = list_slides(slides, recursive=recursive)
    outs = output_for(paths, out, layout)
    single = len(outs) == 1 and outs[0] == out  # --out names the one output file: no batch record
    rank, world = dist_rank_world()
    record = None if single else slides_csv_path(out, rank, world)
    # before any work: no output may be, or sit among, the input slides
    refuse_overlap([*slides, *paths], out_files=[f for o in outs for f in SlideOutputs.for_tiff(o).files()]
                   + ([] if record is None else [record]), out_dirs=[] if single else [out], recursive=recursive)
    if single and layout == "openslide" and out.name.lower().endswith((".ome.tif", ".ome.tiff")):
        click.echo(f"warning: {out}: --layout openslide writes a plain pyramidal TIFF, not an OME-TIFF; readers "
                   "that go by the name (QuPath → Bio-Formats) will see one resolution. Name it .tiff.", err=True)
    mine = shard(list(zip(paths, outs)), rank, world)
    lm = load_model(checkpoint, device, fast=fast, precision=precision)
    opts = SlideOptions(tile=tile, overlap=overlap, margin=margin, batch_size=batch_size, compression=compression,
                        quality=quality, layout=layout, geometry=geometry, slide_mpp=slide_mpp, default_mpp=default_mpp, resume=resume,
                        keep_work=keep_work, all_tiles=all_tiles, min_tissue=min_tissue,
                        level_threshold=level_threshold, precision=precision, progress=not quiet, workers=workers,
                        normalize=normalize, map_mpp=map_mpp)
    opts.check_tiles(lm.multiple)  # the same for every slide: refused once, before the first
    check_normalize(normalize, lm)  # so is a normalisation the model file gives no target for
    label = f"rank {rank}: " if world > 1 else ""
    rows = run_batch(lm, mine, opts, BatchOptions(overwrite=overwrite, keep_going=len(mine) > 1, csv=record,
                                                  label=label), lambda line, err: click.echo(line, err=err))
    _report(rows, record, label)


def _report(rows: list[SlideRow], record: Path | None, label: str) -> None:
    """The batch's last line; raises (exit 1) when a slide failed."""
    failed = [r for r in rows if r.status == "failed"]
    counts = {s: sum(r.status == s for r in rows) for s in ("done", "skipped", "failed")}
    written = record is not None and len(failed) < len(rows)  # run_batch writes it once a slide is not failed
    if len(rows) > 1 or written:
        click.echo(f"{label}{len(rows)} slide{'s' if len(rows) != 1 else ''}: "
                   + ", ".join(f"{n} {s}" for s, n in counts.items())
                   + (f"; see {record}" if written and not failed else ""), err=True)
    if failed:
        names = ", ".join(r.slide.name for r in failed[:3]) + (", …" if len(failed) > 3 else "")
        bugs = sum(r.bug for r in failed)
        raise fail(f"{label}{len(failed)} of {len(rows)} slides failed ({names})"
                   + (f", {bugs} by an internal error (a bug: traceback above; please report it)" if bugs else "")
                   + (f"; see {record}" if written else "; see the lines above"))

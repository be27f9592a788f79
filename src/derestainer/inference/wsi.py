"""Whole-slide inference: read, resample, mask, stream tiles through the model, write a pyramidal OME-TIFF.

:func:`translate_slide` runs one slide through the steps, each in its own module (docs/inference.md):

1. **Read** (:mod:`.slides`): OpenSlide, tifffile or Pillow, by suffix and content.
2. **Resolution** (:mod:`.plan`): the pyramid level to read and its resampling to the model's µm/px.
3. **Tissue mask** on a thumbnail (:func:`.plan.select_tiles`); tiles without tissue are not run.
4. **Tiles** (:mod:`.stream`): blended one row of tiles at a time into bands, saved to a work folder
   and streamed into the TIFF writer (:mod:`.ometiff`). Memory: O(tile × width).
5. **Outputs** beside the TIFF (:mod:`.slide_outputs`): heat map PNG, tiles CSV, summary JSON.

Interruptions leave no file at the output path (temporary name, renamed at the end); the work
folder keeps finished bands so that ``resume=True`` skips them. The output is locked while it is
written (a second job on the same output is refused, naming the holder), and its summary JSON is
written last: from the moment the new TIFF replaces the old one until then, a hidden
``.NAME.summary.json.unfinished`` marker stands beside it.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from derestainer.core.errors import SlideError
from derestainer.core.guard import output_lock, refuse_overlap, unfinished_until_done
from derestainer.inference.geometry import output_geometry, resample_rows
from derestainer.inference.loading import LoadedModel
from derestainer.inference.normalize import fit_slide_normalizer, normalization_record
from derestainer.inference.ometiff import remove_tree, write_pyramid
from derestainer.inference.plan import SlidePlan, plan_slide, select_tiles
from derestainer.inference.precision import ResolvedPrecision
from derestainer.inference.prediction import resolved_precision
from derestainer.inference.provenance import slide_provenance
from derestainer.inference.slide_options import SlideOptions
from derestainer.inference.slide_outputs import SlideOutputs, SlideResult, write_slide_outputs
from derestainer.inference.slides import SlideReader, open_slide
from derestainer.inference.stream import BandStream, WorkFolder, resume_settings


def translate_slide(lm: LoadedModel, slide: str | os.PathLike[str], out: str | os.PathLike[str],
                    options: SlideOptions = SlideOptions()) -> dict[str, Any]:
    """Translate one slide into a pyramidal (OME-)TIFF of virtual IHC with heat map, tile CSV and summary.

    Args:
        lm: loaded model (:func:`~.loading.load_model`); slide: slide file; out: output TIFF path
            (``*.ome.tiff``); options: see :class:`~.slide_options.SlideOptions`.
    Returns:
        The summary (also written as ``<stem>.summary.json``).
    Raises:
        SlideError: unreadable slide, unknown resolution, bad tile settings, or a work folder from
            other settings when resuming.
    """
    t_start, slide, outs, o = time.perf_counter(), Path(slide), SlideOutputs.for_tiff(out), options
    o.check_tiles(lm.multiple)
    precision = _precision(lm, o)
    refuse_overlap([slide], out_files=outs.files())
    # one lock for the TIFF and its side files (named by the stem, as they are); the old outputs stay
    # complete until the new TIFF is renamed into place, which is when the rewriting begins
    with output_lock(outs.tiff, folder=False, lock=outs.lock), open_slide(slide) as reader:
        plan = _plan(reader, lm, o, slide)
        sel = select_tiles(reader, plan, thumbnail_side=o.thumbnail_side, all_tiles=o.all_tiles,
                           min_tissue=o.min_tissue)
        norm = fit_slide_normalizer(o.normalize, lm, reader, plan, sel, slide)  # --normalize: on tissue tiles
        with unfinished_until_done(outs.summary, lazy=True) as state:
            work = WorkFolder(outs.work)
            done = work.start(resume_settings(slide, lm, plan, sel.run, precision, normalization_record(norm)),
                              resume=o.resume,
                              n_rows=plan.grid.n_rows)
            stream = BandStream(lm, reader, plan, sel.run, work, done, o, norm)
            # what made the output, embedded in the TIFF and repeated in the summary (docs/inference.md, "Provenance")
            width, height, out_mpp = output_geometry(plan, reader.dimensions, o.geometry)
            prov = slide_provenance(lm, slide, slide_mpp=plan.slide_mpp, output_mpp=out_mpp,
                                    objective_power=reader.objective_power, normalization=normalization_record(norm))
            pyr = o.pyramid(f"{slide.name} — virtual HER2 IHC (derestainer)", "").with_provenance(prov)
            with tqdm(total=int(sel.run.sum()), initial=stream.done_tiles, unit="tile", desc=slide.name,
                      disable=not o.progress, dynamic_ncols=True, smoothing=0.1) as bar:
                # native geometry: the model-resolution bands resampled, streamed, to the slide's level 0
                rows = resample_rows(stream.rows(bar), (plan.width, plan.height), (width, height))
                pyramid = write_pyramid(outs.tiff, rows, height, width, out_mpp, work_dir=outs.work, options=pyr,
                                        before_rename=state.begin)
            summary = write_slide_outputs(SlideResult(
                slide, outs, reader.vendor, reader.dimensions, lm.path, str(lm.device), lm.level_names, plan, o,
                sel, stream.probs_grid, pyramid, resumed=bool(done), computed_tiles=stream.computed_tiles,
                model_seconds=stream.model_seconds, seconds=time.perf_counter() - t_start))
        if not o.keep_work:
            remove_tree(outs.work)
    return summary


def _precision(lm: LoadedModel, o: SlideOptions) -> ResolvedPrecision:
    try:
        return resolved_precision(lm.model, lm.device, o.precision)
    except ValueError as exc:  # a precision the fast model was not built with
        raise SlideError(str(exc)) from exc


def _plan(reader: SlideReader, lm: LoadedModel, o: SlideOptions, slide: Path) -> SlidePlan:
    """The slide's plan at level-0 µm/px ``o.slide_mpp`` (every slide), else the metadata's, else ``o.default_mpp``."""
    def given(v: float | None) -> float | None:  # 0, negative or NaN count as none given (or stated)
        return v if v is not None and v > 0 else None

    mpp, source = given(o.slide_mpp), "--mpp"
    if mpp is None and given(reader.mpp) is None:
        if given(o.default_mpp) is None:
            raise SlideError(
                f"{slide}: the slide does not state its resolution (microns per pixel); pass --default-mpp X "
                f"for the slides that lack it, or --slide-mpp X for every slide (e.g. 0.25 for a 40× scan, 0.5 for 20×)")
        mpp, source = o.default_mpp, "--default-mpp"
    try:
        plan = plan_slide(reader, lm.mpp, tile=o.tile, overlap=o.overlap, margin=o.margin, slide_mpp=mpp)
    except SlideError:
        raise
    except ValueError as exc:  # tile settings the grid refuses
        raise SlideError(f"{slide}: {exc}") from exc
    return replace(plan, mpp_source=source) if mpp is not None else plan


__all__ = ["translate_slide"]

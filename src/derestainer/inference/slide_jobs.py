"""Many slides: finding slide files in the inputs, one output TIFF per slide, sharding across ranks, and a
batch that goes on past a bad slide and records every slide in ``slides.csv``.

A batch (:func:`run_batch`) reports each slide as ``slide i of N: ...``. A slide whose TIFF and summary
JSON both exist (and no unfinished marker) is done and skipped unless ``overwrite``. A user error on one
slide (a :class:`~derestainer.core.errors.DerestainerError`, or an ``OSError`` reading the slide) is one
line naming the slide, and the batch goes on. Any other exception is a bug: its traceback is printed in
full where it happened, the slide is recorded as failed with the exception's type and message, and the
batch goes on (a bug met on one slide's data should not cost the rest of an overnight batch; the caller
exits non-zero). An ``OSError`` writing the outputs (full disk, read-only folder) ends the batch: every
slide after it would fail the same way. A batch of one slide (``keep_going=False``) raises as a single
slide run does.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from derestainer.core.errors import DerestainerError, SlideError
from derestainer.core.guard import unfinished_marker
from derestainer.core.io import IMAGE_SUFFIXES, WRITE_ERRNOS, write_text
from derestainer.inference.loading import LoadedModel
from derestainer.inference.ometiff import Layout
from derestainer.inference.slide_options import SlideOptions
from derestainer.inference.slide_outputs import SlideOutputs, strip_tiff_suffixes
from derestainer.inference.slides import SLIDE_SUFFIXES
from derestainer.inference.wsi import translate_slide

T = TypeVar("T")

#: Output name per TIFF layout: only an OME-TIFF is named ``.ome.tiff`` (QuPath and other readers pick
#: Bio-Formats by that name, which sees a single resolution in the plain pyramidal layout).
TIFF_SUFFIX: dict[str, str] = {"ome": ".ome.tiff", "openslide": ".tiff"}

#: ``--out`` names with these suffixes are files of another kind, never the output folder.
FILE_SUFFIXES: frozenset[str] = frozenset(
    {*SLIDE_SUFFIXES, *IMAGE_SUFFIXES, ".gif", ".jp2", ".json", ".csv", ".txt", ".yaml", ".yml", ".html",
     ".pdf", ".zip", ".gz", ".safetensors", ".pt"} - {".tif", ".tiff"})

#: Suffixes only whole-slide formats use (vendor formats and BigTIFF): never decoded whole as one image.
WSI_SUFFIXES: tuple[str, ...] = (".svs", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".svslide", ".bif", ".dcm",
                                 ".btf", ".tf8", ".tf2")

Status = Literal["done", "skipped", "failed"]
#: Columns of ``slides.csv``, in order.
CSV_COLUMNS = ("slide", "status", "call", "tissue_mm2", "seconds", "output", "error", "mpp", "mpp_source")


def list_slides(inputs: Sequence[str | os.PathLike[str]], recursive: bool = False) -> list[Path]:
    """Slide files from files and folders (folders: files with a slide suffix, sorted)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            it = p.rglob("*") if recursive else p.iterdir()
            out.extend(sorted(f for f in it if f.is_file() and not f.name.startswith(".")
                              and f.name.lower().endswith(SLIDE_SUFFIXES)))
        elif p.is_file():
            out.append(p)
        else:
            raise SlideError(f"{p}: no such slide file or folder")
    if not out:
        raise SlideError("no slides found in the inputs")
    return out


def output_for(slides: Sequence[Path], out: str | os.PathLike[str], layout: Layout = "ome") -> list[Path]:
    """Output TIFF per slide: ``out`` itself when it names a ``.tif(f)`` file (one slide only), else
    ``out/<stem>.ome.tiff`` (layout ``ome``) or ``out/<stem>.tiff`` (layout ``openslide``).

    Raises:
        SlideError: several slides with one file name, two slides with the same stem, or an ``out`` that
            names a file of another kind (``x.png``) or an existing file that is not a TIFF.
    """
    o = Path(out)
    if o.name.lower().endswith((".tif", ".tiff")):
        if len(slides) != 1:
            raise SlideError(f"{o}: a single output file for {len(slides)} slides; give a folder as --out")
        return [o]
    if o.exists() and not o.is_dir():
        raise SlideError(f"{o}: --out exists and is not a folder; give a .tif/.tiff file (one slide) or a folder")
    if not o.is_dir() and o.suffix.lower() in FILE_SUFFIXES:
        raise SlideError(f"{o}: --out must be a .tif/.tiff file (one slide) or a folder, not a {o.suffix} file")
    paths = [o / f"{strip_tiff_suffixes(s.name)}{TIFF_SUFFIX[layout]}" for s in slides]
    seen: dict[Path, Path] = {}
    for s, pth in zip(slides, paths):
        # every file of a slide's outputs: `a.svs`'s map a.her2.ome.tiff is `a.her2.svs`'s TIFF
        for f in (pth, *SlideOutputs.for_tiff(pth).files()):
            if f in seen and seen[f] != s:
                raise SlideError(f"{seen[f]} and {s} would both be written to {f}; rename one of them or give them separate --out folders")
            seen[f] = s
    return paths


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Items of this rank: item ``i`` goes to rank ``i % world`` (torchrun's RANK / WORLD_SIZE)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad rank {rank} of world size {world}")
    return [x for i, x in enumerate(items) if i % world == rank]


def dist_rank_world() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` from the environment (torchrun), ``(0, 1)`` otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def slides_csv_path(folder: str | os.PathLike[str], rank: int = 0, world: int = 1) -> Path:
    """The batch record in the output folder: ``slides.csv``, or ``slides.rank{r}.csv`` for each rank under
    torchrun (ranks share no process group, so each writes its own and none overwrites another's)."""
    return Path(folder) / ("slides.csv" if world == 1 else f"slides.rank{rank}.csv")


def whole_slide_kind(path: str | os.PathLike[str]) -> str | None:
    """What makes ``path`` a whole slide (a vendor/BigTIFF suffix, or a pyramidal TIFF), or None."""
    p = Path(path)
    name = p.name.lower()
    for sfx in WSI_SUFFIXES:
        if name.endswith(sfx):
            return f"a {sfx} whole-slide file"
    if not name.endswith((".tif", ".tiff")):
        return None
    try:
        import tifffile  # optional (the wsi extra); without it only suffixes are known
    except ImportError:
        return None
    try:
        with tifffile.TiffFile(str(p)) as tf:
            vendor = next((f for f in ("svs", "ndpi", "scn", "bif", "philips", "qpi") if getattr(tf, f"is_{f}", False)),
                          None)
            levels = len(tf.series[0].levels) if tf.series else 1
    except Exception:  # not a TIFF tifffile reads: the image reader reports what is wrong with it
        return None
    if vendor:
        return f"a whole slide ({vendor} TIFF)"
    return f"a pyramidal TIFF ({levels} resolution levels), i.e. a whole slide" if levels > 1 else None


def refuse_whole_slides(paths: Sequence[Path]) -> None:
    """Raises SlideError naming the first whole slide in ``paths``: `translate` decodes an image whole."""
    for p in paths:
        kind = whole_slide_kind(p)
        if kind:
            raise SlideError(f"{p}: {kind}, which `translate` would decode whole into memory; use "
                             f"`derestainer translate-slide {p} --out FOLDER` (tiled, pyramidal output)")


def finished(tiff: str | os.PathLike[str]) -> bool:
    """Whether the slide output ``tiff`` is complete: it and its summary JSON exist, and no unfinished marker."""
    outs = SlideOutputs.for_tiff(tiff)
    return outs.tiff.is_file() and outs.summary.is_file() and not unfinished_marker(outs.summary).exists()


@dataclass
class SlideRow:
    """One row of ``slides.csv``."""

    slide: Path
    output: Path
    status: Status = "done"
    call: str = ""
    tissue_mm2: float | None = None
    seconds: float | None = None
    error: str = ""
    mpp: float | None = None
    mpp_source: str = ""
    bug: bool = field(default=False, repr=False)  # failed by an exception that is not a user error

    def fill(self, summary: dict[str, Any]) -> SlideRow:
        """Take the call, tissue area and µm/px from a slide's summary; return self."""
        self.call = str(summary.get("predicted_level") or "")
        area, mpp = summary.get("tissue_area_mm2"), summary.get("slide_mpp")
        self.tissue_mm2 = float(area) if isinstance(area, int | float) else None
        self.mpp = float(mpp) if isinstance(mpp, int | float) else None
        self.mpp_source = str(summary.get("mpp_source") or "")
        return self

    def cells(self) -> list[str]:
        def num(v: float | None, fmt: str) -> str:
            return "" if v is None else format(v, fmt)

        return [str(self.slide), self.status, self.call, num(self.tissue_mm2, ".6g"), num(self.seconds, ".1f"),
                str(self.output), self.error, num(self.mpp, "g"), self.mpp_source]


def write_slides_csv(path: str | os.PathLike[str], rows: Sequence[SlideRow]) -> Path:
    """Write the batch record (columns :data:`CSV_COLUMNS`) atomically."""
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(CSV_COLUMNS)
    wr.writerows(r.cells() for r in rows)
    return write_text(path, buf.getvalue())


#: ``echo(line, err)``: print one line, to stderr when ``err``.
Echo = Callable[[str, bool], None]


@dataclass(frozen=True)
class BatchOptions:
    """How :func:`run_batch` goes through the slides.

    Attributes:
        overwrite: redo slides whose outputs are complete (else they are skipped).
        keep_going: record a failing slide and go on (False: raise, as a single slide run does).
        csv: where to keep ``slides.csv`` (rewritten after each slide once one is done or skipped), or None.
        label: prefix of every progress line (e.g. ``rank 1: ``).
    """

    overwrite: bool = False
    keep_going: bool = True
    csv: Path | None = None
    label: str = ""


def run_batch(lm: LoadedModel, jobs: Sequence[tuple[Path, Path]], options: SlideOptions, batch: BatchOptions,
              echo: Echo) -> list[SlideRow]:
    """Translate each ``(slide, output TIFF)`` of ``jobs``; return one row per slide (see the module doc)."""
    rows: list[SlideRow] = []
    for i, (slide, dst) in enumerate(jobs, 1):
        head = f"{batch.label}slide {i} of {len(jobs)}: "
        if not batch.overwrite and finished(dst):
            rows.append(SlideRow(slide, dst, "skipped").fill(_read_summary(dst)))
            echo(f"{head}{slide}: done before, skipped (use --overwrite)", False)
        else:
            echo(f"{head}{slide}", True)
            rows.append(_run_one(lm, slide, dst, options, batch.keep_going, head, echo))
        if batch.csv is not None and any(r.status != "failed" for r in rows):
            write_slides_csv(batch.csv, rows)  # a batch in which every slide failed leaves no file
    return rows


def _run_one(lm: LoadedModel, slide: Path, dst: Path, options: SlideOptions, keep_going: bool, head: str,
             echo: Echo) -> SlideRow:
    t0 = time.perf_counter()
    row = SlideRow(slide, dst, "failed")
    try:
        s = translate_slide(lm, slide, dst, options)
    except DerestainerError as exc:
        if not keep_going:
            raise
        row.error = str(exc)
    except OSError as exc:
        # a full disk or read-only output folder stops the batch; an unreadable slide is that slide's
        if not keep_going or (exc.errno in WRITE_ERRNOS and not _about(exc, slide)):
            raise
        row.error = f"{exc.filename or slide}: {exc.strerror or exc}"
    except Exception as exc:  # a bug: traceback shown in full, the slide recorded, the batch goes on
        if not keep_going:
            raise
        echo(traceback.format_exc().rstrip(), True)
        row.error, row.bug = f"{type(exc).__name__}: {exc} (internal error: a bug; traceback above)", True
    row.seconds = time.perf_counter() - t0
    if row.error:
        named = str(slide) in row.error
        echo(f"{head}{'' if named else f'{slide}: '}failed: {row.error}", True)
        return row
    for warning in s.get("warnings", []):
        echo(f"warning: {slide}: {warning}", True)
    level = f", slide level {s['predicted_level']}" if s.get("predicted_level") is not None else ""
    rate = f", {s['tiles_per_second']:.1f} tiles/s" if s.get("tiles_per_second") else ""
    echo(f"{head}{slide} → {dst} ({s['output_size'][0]}×{s['output_size'][1]} px at {s['output_mpp']:g} µm/px, "
         f"{s['tiles']['run']}/{s['tiles']['total']} tiles{rate}{level})", False)
    row.status = "done"
    return row.fill(s)


def _about(exc: OSError, slide: Path) -> bool:
    """Whether ``exc`` is about the slide file itself (reading it), not about an output."""
    if not isinstance(exc.filename, str | bytes | os.PathLike):
        return False
    return Path(os.fsdecode(exc.filename)).resolve() == slide.resolve()


def _read_summary(tiff: Path) -> dict[str, Any]:
    """A finished slide's summary (empty when it cannot be read: the row then has no call)."""
    try:
        data = json.loads(SlideOutputs.for_tiff(tiff).summary.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


__all__ = ["CSV_COLUMNS", "FILE_SUFFIXES", "TIFF_SUFFIX", "WSI_SUFFIXES", "BatchOptions", "SlideRow",
           "dist_rank_world", "finished", "list_slides", "output_for", "refuse_whole_slides", "run_batch", "shard",
           "slides_csv_path", "whole_slide_kind", "write_slides_csv"]

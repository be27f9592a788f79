"""Translating image files and folders: which outputs go where, batching by size, predictions files."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from derestainer.core import resample
from derestainer.core.guard import output_lock, refuse_overlap, unfinished_until_done
from derestainer.core.io import list_images, read_image, write_image, write_json, write_text
from derestainer.inference.loading import LoadedModel
from derestainer.inference.precision import Precision
from derestainer.inference.prediction import INPUT_RESIZE, translate_array

#: The files beside the images of a translated folder; ``predictions.json`` is written last.
PREDICTION_FILES: tuple[str, ...] = ("predictions.csv", "predictions.json")


@dataclass(frozen=True)
class Job:
    """One input image and where its output goes (``rel``: output path relative to the output folder)."""

    src: Path
    rel: Path


def collect_inputs(inputs: Iterable[str | os.PathLike[str]], recursive: bool = True, suffix: str = ".png") -> list[Job]:
    """Input images with output paths that mirror the folder structure.

    A file ``a/b.jpg`` given directly → ``b.png``; a folder ``F`` → each image ``F/x/y.tif`` →
    ``x/y.png`` (only ``F``'s own images unless ``recursive``).

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: two inputs would write the same output file, or no images were found.
    """
    jobs: list[Job] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in list_images(p, recursive=recursive):
                jobs.append(Job(f, f.relative_to(p).with_suffix(suffix)))
        elif p.is_file():
            jobs.append(Job(p, Path(p.name).with_suffix(suffix)))
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    seen: dict[Path, Path] = {}
    for j in jobs:
        if j.rel in seen:
            raise ValueError(f"{seen[j.rel]} and {j.src} would both be written to {j.rel}; translate them separately")
        seen[j.rel] = j.src
    if not jobs:
        raise ValueError("no images found in the inputs (suffixes: .png .jpg .jpeg .tif .tiff .bmp .webp)")
    return jobs


@dataclass(frozen=True)
class TranslateOptions:
    """How :func:`translate_files` runs the model (see :func:`~.prediction.translate_array`)."""

    batch_size: int = 8
    tta: bool = False
    input_mpp: float | None = None
    precision: Precision = "auto"
    output_size: str = "input"
    resize_filter: str = resample.DEFAULT_FILTER


class _SizeBatches:
    """Images grouped by size, translated a group at a time; collects one prediction row per job."""

    def __init__(self, lm: LoadedModel, jobs: Sequence[Job], out: Path, options: TranslateOptions,
                 progress: Callable[[int], object] | None, before_write: Callable[[], None] = lambda: None) -> None:
        self.lm, self.jobs, self.out, self.o, self.progress = lm, jobs, out, options, progress
        self.before_write = before_write
        self.rows: dict[int, dict[str, Any]] = {}
        self.groups: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}

    def add(self, idx: int, im: np.ndarray) -> None:
        key = (int(im.shape[0]), int(im.shape[1]))
        self.groups.setdefault(key, []).append((idx, im))
        if len(self.groups[key]) >= self.o.batch_size:
            self.flush(key)
        elif sum(len(g) for g in self.groups.values()) >= 4 * self.o.batch_size:
            self.flush(max(self.groups, key=lambda k: len(self.groups[k])))  # many sizes: bound the images held

    def flush(self, key: tuple[int, int]) -> None:
        items = self.groups.pop(key, [])
        if not items:
            return
        ihc, probs = translate_array(self.lm, [im for _, im in items], tta=self.o.tta, input_mpp=self.o.input_mpp,
                                     precision=self.o.precision, output_size=self.o.output_size,
                                     resize_filter=self.o.resize_filter)
        self.before_write()  # the first output replaced: the folder is unfinished until predictions.json
        for b, (idx, _) in enumerate(items):
            job = self.jobs[idx]
            write_image(self.out / job.rel, ihc[b])
            row = _prediction_row(job, probs[b] if probs is not None else None, self.lm.level_names)
            row["input_size"] = f"{items[b][1].shape[1]}x{items[b][1].shape[0]}"  # WxH, as evaluate's sizes
            row["output_size"] = f"{ihc[b].shape[1]}x{ihc[b].shape[0]}"
            self.rows[idx] = row
        if self.progress is not None:
            self.progress(len(items))

    def finish(self) -> list[dict[str, Any]]:
        for key in list(self.groups):
            self.flush(key)
        return [self.rows[i] for i in range(len(self.jobs))]


def translate_files(
    lm: LoadedModel,
    jobs: Sequence[Job],
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 8,
    tta: bool = False,
    input_mpp: float | None = None,
    precision: Precision = "auto",
    output_size: str = "input",
    resize_filter: str = resample.DEFAULT_FILTER,
    progress: Callable[[int], object] | None = None,
) -> list[dict[str, Any]]:
    """Translate images to ``out_dir`` and write ``predictions.csv`` and ``predictions.json`` there.

    Images of equal size are batched together (up to ``batch_size``). Each row of the predictions:
    input path, output path (relative to ``out_dir``), predicted level name, and one probability
    per level (empty when the model has no f_level head). ``output_size``, ``resize_filter``: where the
    output is left (:func:`~.prediction.translate_array`); ``predictions.json → output`` records both, and
    ``derestainer evaluate`` copies that record into its report.

    The output folder is locked while it is written (:func:`~derestainer.core.guard.output_lock`);
    ``predictions.json`` is written last: from the first image written until then, a hidden
    ``.predictions.json.unfinished`` marker stands in the folder (and the old ``predictions.json`` is gone).

    Raises:
        ImageReadError: an input image cannot be read (nothing is written for it; earlier outputs stay).
        OutputError: the output folder holds an input, is locked by another job, or cannot be written.
    """
    out = Path(out_dir)
    refuse_overlap([j.src for j in jobs], out_files=[out / j.rel for j in jobs] + [out / f for f in PREDICTION_FILES])
    with output_lock(out, folder=True), unfinished_until_done(out / "predictions.json", lazy=True) as state:
        options = TranslateOptions(batch_size, tta, input_mpp, precision, output_size, resize_filter)
        batches = _SizeBatches(lm, jobs, out, options, progress, before_write=state.begin)
        for idx, job in enumerate(jobs):
            batches.add(idx, read_image(job.src))
        ordered = batches.finish()
        write_predictions(out, ordered, lm, output_record(options, lm))
    return ordered


def output_record(o: TranslateOptions, lm: LoadedModel) -> dict[str, Any]:
    """``predictions.json → output``: how the images were brought to the model and back."""
    return {
        "output_size": o.output_size,
        "resize_filter": o.resize_filter if o.output_size == "input" else None,
        "resize": resample.describe(o.resize_filter) if o.output_size == "input" else "none (model working size)",
        "input_mpp": o.input_mpp, "model_mpp": lm.mpp,
        "input_resize": INPUT_RESIZE if o.input_mpp else "none (inputs taken at the model's µm/px)",
        "precision": o.precision, "tta": o.tta,
    }


def _prediction_row(job: Job, probs: np.ndarray | None, names: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"input": str(job.src), "output": job.rel.as_posix()}
    if probs is None:
        row["level"] = None
        row["probabilities"] = None
    else:
        row["level"] = names[int(np.argmax(probs))]
        row["probabilities"] = {n: float(p) for n, p in zip(names, probs)}
    return row


def write_predictions(out_dir: Path, rows: Sequence[dict[str, Any]], lm: LoadedModel,
                      output: dict[str, Any] | None = None) -> None:
    """``predictions.csv`` (input, output, level, p_<level>...) and ``predictions.json`` (with model info)."""
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(["input", "output", "level"] + [f"p_{n}" for n in lm.level_names])
    for r in rows:
        probs = r["probabilities"]
        wr.writerow([r["input"], r["output"], r["level"] or ""]
                    + ([f"{probs[n]:.6f}" for n in lm.level_names] if probs else [""] * len(lm.level_names)))
    write_text(out_dir / "predictions.csv", buf.getvalue())
    write_json(out_dir / "predictions.json", {
        "model": str(lm.path),
        "model_name": lm.meta.get("model"),
        "model_mpp": lm.mpp,
        "levels": list(lm.level_names),
        "has_level_head": any(r["probabilities"] is not None for r in rows),
        "output": output,
        "images": list(rows),
    })


__all__ = ["Job", "TranslateOptions", "collect_inputs", "translate_files", "write_predictions"]

"""The streaming loop of whole-slide translation, and the work folder that lets it resume.

Tiles of ``tile`` px overlapping by ``overlap`` px are blended by the raised-cosine partition of
unity of :mod:`.tiling`, one row of tiles at a time (tiles read by a thread pool, the next row
prefetched while this one runs). Each finished row band is saved to the work folder (PNG plus a
``band_NNNNN.json`` side file with its rows and level probabilities) and yielded to the TIFF writer
(:mod:`.ometiff`). Memory: O(tile × width). ``progress.json`` holds the settings the bands were made
with; resuming with other settings is refused.

What is in flight is bounded independently of the slide's height: the reader pool is only ever given
this tile row and the next (rows are submitted by the consumer loop, so a slow model holds the
readers back rather than letting read tiles pile up), counted in ``BandStream.tiles_in_flight`` and
never above ``BandStream.tile_bound`` = 2 × tiles per row; the model sees ``batch_size`` tiles at a
time; the blender holds ``tile`` rows; one band at a time is handed to the writer.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from derestainer.core.errors import SlideError
from derestainer.core.io import atomic_path, clean_stale_temps, write_json
from derestainer.core.ranges import signed_to_unit, uint8_to_signed
from derestainer.inference.loading import LoadedModel
from derestainer.inference.ometiff import remove_tree
from derestainer.inference.optimize import InferenceModel
from derestainer.inference.plan import SlidePlan, read_model_region
from derestainer.inference.precision import Precision, ResolvedPrecision
from derestainer.inference.prediction import predict
from derestainer.inference.slide_options import SlideOptions
from derestainer.inference.slide_outputs import ProbsGrid
from derestainer.inference.slides import SlideReader
from derestainer.inference.tiling import BandBlender, HighWater

PROGRESS_FORMAT = 2  # 2: settings in progress.json (written once), one band_NNNNN.json per finished band

_Futures = list[tuple[int, "cf.Future[np.ndarray]"]]


def infer_tiles(lm: LoadedModel, tiles: list[np.ndarray], precision: Precision) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 tiles → (virtual IHC float32 ``[N, T, T, 3]`` in [0, 1], probabilities ``[N, K]`` or None)."""
    x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2)
    x = uint8_to_signed(x.to(lm.device, non_blocking=True))
    ihc, probs = predict(lm.model, x, multiple=lm.multiple, precision=precision)
    out = signed_to_unit(ihc).clamp_(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return out, (None if probs is None else probs.cpu().numpy())


def save_band(path: Path, rows: np.ndarray) -> None:
    """A finished band as PNG (fast compression), atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(rows).save(tmp, format="PNG", compress_level=1)


def load_band(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A band saved by :func:`save_band`, checked to be ``shape`` (rows, width)."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    if arr.shape[:2] != shape:
        raise SlideError(f"{path}: band of shape {arr.shape[:2]}, expected {shape}; delete the work folder and rerun")
    return arr


def _file_sig(p: Path) -> list[Any]:
    st = p.stat()
    return [str(p.resolve()), st.st_size, int(st.st_mtime)]


def resume_settings(slide: Path, lm: LoadedModel, plan: SlidePlan, run: np.ndarray,
                    precision: ResolvedPrecision, normalization: dict[str, Any] | None = None) -> dict[str, Any]:
    """What saved bands depend on; a work folder made with other settings is not resumed."""
    return {
        "slide": _file_sig(slide), "model": _file_sig(lm.path), "tile": plan.grid.tile,
        "overlap": plan.grid.overlap, "margin": plan.grid.margin, "scale": plan.scale, "level": plan.level,
        "height": plan.height, "width": plan.width, "run": run.astype(int).tolist(),
        # Numerics: bands saved at another precision or by the other path would not match new ones.
        "precision": precision,
        "fast": isinstance(lm.model, InferenceModel),
        # stain normalisation (inference.normalize), fitted stains included; absent without one (older folders resume)
        **({} if normalization is None else {"normalization": normalization}),
    }


class WorkFolder:
    """The work folder of one slide: ``progress.json`` and the finished bands with their side files."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def band_png(self, i: int) -> Path:
        return self.path / f"band_{i:05d}.png"

    def band_json(self, i: int) -> Path:
        return self.path / f"band_{i:05d}.json"

    def start(self, settings: dict[str, Any], *, resume: bool, n_rows: int) -> dict[int, Any]:
        """Resume (finished bands' side files by row) when asked and possible; else start afresh (``{}``).

        Raises:
            SlideError: the saved progress was made with other settings.
        """
        progress_path = self.path / "progress.json"
        done: dict[int, Any] = {}
        if resume and progress_path.is_file():
            state = json.loads(progress_path.read_text())
            if state.get("format") != PROGRESS_FORMAT or state.get("settings") != settings:
                saved = state.get("settings", {})
                diff = sorted(k for k in settings.keys() | saved.keys() if saved.get(k) != settings.get(k))
                raise SlideError(
                    f"{self.path}: the saved progress was made with other settings ({', '.join(diff) or 'format'}); "
                    f"delete that folder or run without --resume"
                )
            clean_stale_temps(self.path)  # half-written bands of a killed run
            # A band is done when its image and then its side file (rows, probabilities) were written.
            for i in range(n_rows):
                if self.band_json(i).is_file() and self.band_png(i).is_file():
                    done[i] = json.loads(self.band_json(i).read_text())
        else:
            remove_tree(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            write_json(progress_path, {"format": PROGRESS_FORMAT, "settings": settings})
        return done

    def save(self, i: int, band: np.ndarray, rows: tuple[int, int], probs: list[list[float] | None]) -> None:
        """Band ``i``'s image, then its side file (which marks it finished)."""
        save_band(self.band_png(i), band)
        write_json(self.band_json(i), {"rows": list(rows), "probs": probs})


class BandStream:
    """Row bands of the output, top to bottom: loaded from the work folder where finished, else computed.

    Attributes (after :meth:`rows` has run): probs_grid (level probabilities per tile, finished bands
    included), computed_tiles and model_seconds (this session's work), tiles_in_flight (tiles given to
    the reader pool and not yet blended; ``.max`` ≤ :attr:`tile_bound`).
    """

    def __init__(self, lm: LoadedModel, reader: SlideReader, plan: SlidePlan, run: np.ndarray, work: WorkFolder,
                 done: dict[int, Any], options: SlideOptions,
                 normalizer: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self.lm, self.reader, self.plan, self.run, self.work, self.done = lm, reader, plan, run, work, done
        self.normalizer = normalizer  # applied to each tile read (inference.normalize), None: as read
        self.batch_size, self.precision, self.workers = options.batch_size, options.precision, options.workers
        grid = plan.grid
        self.probs_grid: ProbsGrid = [[None] * grid.n_cols for _ in range(grid.n_rows)]
        for i, v in done.items():
            self.probs_grid[i] = v["probs"]
        self.done_tiles = int(sum(run[i].sum() for i in done))
        self.computed_tiles = 0
        self.model_seconds = 0.0
        self.tiles_in_flight = HighWater()

    @property
    def tile_bound(self) -> int:
        """The most tiles ever in flight: this tile row and the prefetched next one."""
        return 2 * self.plan.grid.n_cols

    def _submit(self, pool: cf.ThreadPoolExecutor, i: int) -> _Futures:
        grid, t = self.plan.grid, self.plan.grid.tile
        y0 = int(grid.ys[i])
        futures = [(j, pool.submit(read_model_region, self.reader, self.plan, y0, int(grid.xs[j]), t, t,
                                         self.normalizer))
                   for j in range(grid.n_cols) if self.run[i, j]]
        self.tiles_in_flight.take(len(futures))
        return futures

    def rows(self, bar: Any = None) -> Iterator[np.ndarray]:
        """uint8 bands ``[rows, width, 3]`` summing to the output's height; ``bar``: a tqdm-like progress bar."""
        grid = self.plan.grid
        blender: BandBlender | None = None
        with cf.ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            pending: dict[int, _Futures] = {}
            for i in range(grid.n_rows):
                start, end = grid.final_rows(i)
                if i in self.done:
                    yield load_band(self.work.band_png(i), (end - start, self.plan.width))
                    continue
                if blender is None or blender.row != i:
                    # Fresh start (or resume): recompute from the first tile row reaching row ys[i],
                    # whose contributions to rows ≥ ys[i] are needed; its own finished rows are discarded.
                    r0 = int(np.searchsorted(grid.ys + grid.tile, grid.ys[i], side="right"))
                    blender = BandBlender(grid, channels=3, start_row=r0)
                    for r in range(r0, i):
                        self._blend_row(blender, r, pending.pop(r, []) or self._submit(pool, r))
                        blender.finish_row()
                futures = pending.pop(i, []) or self._submit(pool, i)
                if i + 1 < grid.n_rows and (i + 1) not in self.done:
                    pending[i + 1] = self._submit(pool, i + 1)  # prefetch the next row while this one runs
                t0 = time.perf_counter()
                row_probs = self._blend_row(blender, i, futures, bar)
                self.model_seconds += time.perf_counter() - t0
                self.computed_tiles += int(self.run[i].sum())
                band = np.clip(blender.finish_row() * 255.0 + 0.5, 0, 255).astype(np.uint8)
                self.probs_grid[i] = row_probs
                self.work.save(i, band, (start, end), row_probs)
                yield band

    def _blend_row(self, blender: BandBlender, i: int, futures: _Futures, bar: Any = None) -> list[list[float] | None]:
        """Run the tissue tiles of tile row ``i`` in batches and add them (and white for the rest) to ``blender``.

        ``futures`` is emptied batch by batch, so that each batch's tiles are freed once blended.
        """
        n_cols = self.run.shape[1]
        probs: list[list[float] | None] = [None] * n_cols
        for j in range(n_cols):
            if not self.run[i, j]:
                blender.add_constant(j, 1.0)  # background: white
        while futures:
            chunk = futures[:self.batch_size]
            del futures[:self.batch_size]
            out, p = infer_tiles(self.lm, [f.result() for _, f in chunk], self.precision)
            for k, (j, _) in enumerate(chunk):
                blender.add(j, out[k])
                if p is not None:
                    probs[j] = [float(v) for v in p[k]]
            n = len(chunk)
            del chunk, out, p  # the tiles go before they are counted as gone
            self.tiles_in_flight.release(n)
            if bar is not None:
                bar.update(n)
        return probs


__all__ = ["PROGRESS_FORMAT", "BandStream", "WorkFolder", "infer_tiles", "load_band", "resume_settings", "save_band"]

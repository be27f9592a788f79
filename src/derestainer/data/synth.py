"""SynthBCI: synthetic, physically rendered pairs of H&E and HER2 IHC with a known HER2 level.

One pair is one *field* of breast-carcinoma-like tissue, rendered twice as two adjacent sections:

1. slide parameters are drawn from the seed and the HER2 level (:func:`sample_slide`): tissue
   architecture, tumour fraction, nuclear size and pleomorphism (the H&E's partial cue of the
   level), stain vectors and intensities (per-slide jitter), illumination;
2. a tissue map (tumour nests or cords, stroma, lumina, fat, glass) and cells (a Voronoi
   tessellation of jittered seeds, one nucleus each) are laid out in tissue coordinates;
3. H&E: haematoxylin (nuclei, a little in cytoplasm) and eosin (cytoplasm, fibrous stroma)
   concentration maps;
4. IHC of the adjacent section: the same cells slightly moved and re-cut, a lighter haematoxylin
   counterstain, no eosin, DAB on tumour-cell membranes following the clinical HER2 pattern of the
   level (:data:`HER2_PATTERNS`), then the whole field displaced, rotated and smoothly deformed;
5. both are rendered by Beer–Lambert (``rgb = white · exp(−c·rgb_from_stain)``), blurred and given
   sensor noise like a slide scan.

:func:`render_pair` makes one pair; :func:`generate_dataset` writes a dataset in the BCI layout.
Step 1 lives in :mod:`derestainer.data.synth_params` (with every knob, :class:`SynthParams`), steps
2–4 in :mod:`derestainer.data.synth_tissue`, the image layers in :mod:`derestainer.data.synth_layers`.
The defaults were calibrated against real images (``scripts/calibrate_synth.py``,
``docs/synthbci.md``).
"""

from __future__ import annotations

import io
import math
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from derestainer.core.io import write_bytes, write_json
from derestainer.core.levels import HER2_LEVELS, level_name
from derestainer.data import synth_layers as L
from derestainer.data.synth_params import (
    DISPLACEMENTS,
    HER2_PATTERNS,
    MembranePattern,
    Slide,
    SynthParams,
    displacement_name,
    sample_slide,
    with_displacement,
)
from derestainer.data.synth_tissue import (
    adjacent_cells,
    fat_borders,
    he_concentrations,
    ihc_concentrations,
    place_cells,
)

__all__ = [
    "DISPLACEMENTS",
    "GENERATOR_VERSION",
    "HER2_PATTERNS",
    "SPLITS",
    "MembranePattern",
    "Slide",
    "SynthParams",
    "canvas_padding",
    "dataset_files",
    "displacement_name",
    "encode_png",
    "generate_dataset",
    "pair_level",
    "pair_name",
    "pair_seed",
    "render_pair",
    "sample_slide",
    "stale_files",
    "with_displacement",
]

SPLITS: tuple[str, ...] = ("train", "test")
GENERATOR_VERSION = 2  # 2: membrane arcs cover exactly the asked fraction of the circumference


# --------------------------------------------------------------------------------------------
# One pair
# --------------------------------------------------------------------------------------------

def canvas_padding(size: int, p: SynthParams) -> int:
    """Margin (px) around the field so that the displaced IHC never samples outside the canvas.

    Never less than the ``adjacent`` displacement needs, so that a smaller displacement (e.g.
    ``registered``) draws the same tissue from the same seed."""
    adj = DISPLACEMENTS["adjacent"]
    shift, rot_deg, warp = (max(getattr(p, k), adj[k]) for k in ("max_shift", "max_rotation_deg", "warp_amplitude"))
    rot = abs(math.sin(math.radians(rot_deg))) * size * math.sqrt(0.5)
    return math.ceil((shift + 4 * warp) * p.zoom + rot + 2)


def _scan_pair(rng: np.random.Generator, he_conc: np.ndarray, ihc_conc: np.ndarray, flow: np.ndarray, pad: int,
               s: Slide, p: SynthParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two scanned images from their stain concentrations: ``(he, ihc, ihc concentration)``.

    ``he_conc`` is already cropped to the field; ``ihc_conc`` (canvas) is displaced by ``flow``.
    """
    size = he_conc.shape[-1]
    he_rgb = L.beer_lambert(he_conc.transpose(1, 2, 0), s.he_matrix, s.he_white)
    ihc_c = np.zeros((3, size, size), np.float32)
    ihc_c[[0, 2]] = L.warp_maps(ihc_conc[[0, 2]], flow, pad)  # the IHC has no eosin
    ihc_rgb = L.beer_lambert(ihc_c.transpose(1, 2, 0), s.ihc_matrix, s.ihc_white)
    he = L.scanner(rng, he_rgb, p.blur * p.zoom, p.noise)
    ihc = L.scanner(rng, ihc_rgb, p.blur * p.zoom, p.noise)
    return he, ihc, ihc_c


def render_pair(
    seed: int | Sequence[int],
    level: int,
    size: int = 256,
    params: SynthParams | None = None,
    return_maps: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Render one H&E/IHC pair of HER2 ``level`` (0..3, i.e. 0, 1+, 2+, 3+).

    Args:
        seed: non-negative int, or a sequence of them (e.g. ``(seed, split, index)``); the same seed
            gives the same bytes.
        level: HER2 level index.
        size: side of the square images (px).
        params: generator parameters (defaults: :class:`SynthParams`).
        return_maps: also return the layers in ``info['maps']``: ``tissue`` (uint8 ``[S, S]``
            class map, H&E frame), ``he_concentration`` and ``ihc_concentration`` (float32
            ``[3, S, S]`` H, E, DAB optical densities, each in its own image's frame).
    Returns:
        ``(he, ihc, info)``: uint8 ``[S, S, 3]`` twice, and a dict with ``level``, ``level_name``,
        ``architecture``, ``tumour_fraction`` (of the H&E field), ``nuclear_fraction`` (nucleus
        area / field), ``nucleus_radius`` (slide mean, px), ``n_tumour_cells``,
        ``positive_fraction`` (HER2-stained tumour cells), ``shift`` (px, rows/cols),
        ``rotation_deg``, ``flow`` (float32 ``[2, S, S]``: IHC pixel ``p`` shows the tissue that
        the H&E shows at ``p + flow[:, p]``), ``he_stain_matrix`` and ``ihc_stain_matrix``.
    """
    p = SynthParams() if params is None else params
    if level not in range(4):
        raise ValueError(f"HER2 level must be 0, 1, 2 or 3 (0, 1+, 2+, 3+), got {level!r}")
    if int(size) < 16:
        raise ValueError(f"size must be at least 16 px, got {size}")
    size = int(size)
    rng = np.random.default_rng(seed)
    s = sample_slide(rng, level, p)
    pad = canvas_padding(size, p)
    shape = (size + 2 * pad, size + 2 * pad)

    tissue = L.tissue_layout(
        rng, shape, s.architecture, s.tumour_fraction, p.nest_scale * p.zoom, s.cell_spacing,
        s.lumen_fraction, s.fat_fraction, s.background_fraction,
    )
    fibres = L.collagen_fibres(rng, shape, s.fibre_angle, p.fibre_period * p.zoom)
    fat = fat_borders(rng, tissue, p)
    cells = place_cells(rng, tissue, s, p)
    he_conc, nuc = he_concentrations(rng, tissue, cells, fibres, fat, s, p)

    ihc_cells = adjacent_cells(rng, cells, tissue, p)
    ihc_conc, positive = ihc_concentrations(rng, tissue, ihc_cells, fibres, fat, s, p)
    shift = rng.uniform(-1, 1, 2) * p.max_shift * p.zoom
    rotation = math.radians(rng.uniform(-1, 1) * p.max_rotation_deg)
    flow = L.section_warp(rng, size, shift, rotation, p.warp_amplitude * p.zoom, p.warp_scale * p.zoom)

    crop = (slice(pad, pad + size), slice(pad, pad + size))
    he, ihc, ihc_c = _scan_pair(rng, he_conc[:, crop[0], crop[1]], ihc_conc, flow, pad, s, p)

    centres = cells.tumour.centre - pad
    in_field = np.all((centres >= 0) & (centres < size), axis=1)
    info: dict[str, Any] = {
        "level": level,
        "level_name": level_name(level),
        "architecture": s.architecture,
        "tumour_fraction": float((tissue[crop] == L.TUMOUR).mean()),
        "nuclear_fraction": float(nuc[crop].mean()),
        "nucleus_radius": float(s.nucleus_radius),
        "n_tumour_cells": int(in_field.sum()),
        "positive_fraction": positive,
        "shift": [float(shift[0]), float(shift[1])],
        "rotation_deg": math.degrees(rotation),
        "flow": flow,
        "he_stain_matrix": s.he_matrix.tolist(),
        "ihc_stain_matrix": s.ihc_matrix.tolist(),
    }
    if return_maps:
        info["maps"] = {
            "tissue": tissue[crop].copy(),
            "he_concentration": he_conc[:, crop[0], crop[1]].copy(),
            "ihc_concentration": ihc_c,
        }
    return he, ihc, info


# --------------------------------------------------------------------------------------------
# Datasets in the BCI layout
# --------------------------------------------------------------------------------------------

def pair_seed(seed: int, split: str, index: int) -> tuple[int, int, int]:
    """Seed of pair ``index`` of ``split``: independent of the dataset's size and of the workers."""
    return (int(seed), SPLITS.index(split), int(index))


def pair_level(seed: int, split: str, index: int) -> int:
    """HER2 level of pair ``index``: every block of four consecutive indices holds each level once,
    in a seeded order, so classes stay balanced (±1) for any count."""
    block = np.random.default_rng((int(seed), SPLITS.index(split), int(index) // 4, 0xB1C)).permutation(4)
    return int(block[int(index) % 4])


def pair_name(split: str, index: int, level: int) -> str:
    """BCI file name, e.g. ``00012_train_2+.png``."""
    return f"{index:05d}_{split}_{level_name(level)}.png"


@dataclass(frozen=True)
class _Job:
    out: str
    split: str
    index: int
    seed: int
    size: int
    params: SynthParams = field(default_factory=SynthParams)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image at zlib level 1: half the encoding time of the default level for
    a 8 % larger file (the sensor noise leaves little to compress anyway)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _render_job(job: _Job) -> tuple[str, str, int]:
    level = pair_level(job.seed, job.split, job.index)
    he, ihc, _ = render_pair(pair_seed(job.seed, job.split, job.index), level, job.size, job.params)
    name = pair_name(job.split, job.index, level)
    out = Path(job.out)
    write_bytes(out / "HE" / job.split / name, encode_png(he))  # atomic, like io.write_image
    write_bytes(out / "IHC" / job.split / name, encode_png(ihc))
    return job.split, name, level


def dataset_files(n_train: int, n_test: int, seed: int) -> list[tuple[str, str, int]]:
    """``(split, file name, level)`` of every pair of a dataset, in order."""
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            lvl = pair_level(seed, split, i)
            out.append((split, pair_name(split, i, lvl), lvl))
    return out


def stale_files(out: str | os.PathLike[str], n_train: int, n_test: int, seed: int) -> list[Path]:
    """PNG files already under ``out/{HE,IHC}/{train,test}`` that this dataset would not rewrite."""
    keep = {(s, n) for s, n, _ in dataset_files(n_train, n_test, seed)}
    root = Path(out)
    stale = []
    for modality in ("HE", "IHC"):
        for split in SPLITS:
            folder = root / modality / split
            if folder.is_dir():
                stale += [f for f in sorted(folder.glob("*.png")) if (split, f.name) not in keep]
    return stale


def generate_dataset(
    out: str | os.PathLike[str],
    n_train: int,
    n_test: int,
    size: int = 256,
    seed: int = 0,
    workers: int | None = None,
    params: SynthParams | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write a SynthBCI dataset in the BCI layout.

    ``out/HE/{train,test}/NNNNN_{split}_{level}.png`` and the same names under ``out/IHC``, plus
    ``out/synthbci.json`` (generator version, seed, size, counts, parameters). Every pair depends
    only on ``(seed, split, index)``, so the bytes do not depend on ``workers``. Images are written
    atomically. ``workers`` defaults to ``min(2, cpu count)``; ``progress(done, total)`` is called
    after each pair.

    Returns:
        A summary: ``out``, ``seed``, ``size``, ``counts`` (per split and level name), ``pairs``,
        ``seconds`` and ``pairs_per_s``.
    """
    if n_train < 0 or n_test < 0:
        raise ValueError("the numbers of train and test pairs must be ≥ 0")
    if seed < 0:
        raise ValueError(f"seed must be ≥ 0, got {seed}")
    p = SynthParams() if params is None else params
    t0 = time.perf_counter()
    root = Path(out)
    for modality in ("HE", "IHC"):
        for split in SPLITS:
            (root / modality / split).mkdir(parents=True, exist_ok=True)
    jobs = [_Job(str(root), split, i, seed, int(size), p) for split, n in (("train", n_train), ("test", n_test)) for i in range(n)]
    workers = min(2, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    results: list[tuple[str, str, int]] = []
    if workers == 1 or len(jobs) < 8:
        for job in jobs:
            results.append(_render_job(job))
            if progress:
                progress(len(results), len(jobs))
    else:
        # fork shares the already-imported modules (start-up is most of a small run's time)
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(workers) as pool:
            for r in pool.imap_unordered(_render_job, jobs, chunksize=max(1, min(16, len(jobs) // (4 * workers)))):
                results.append(r)
                if progress:
                    progress(len(results), len(jobs))
    counts = {split: dict.fromkeys(HER2_LEVELS, 0) for split in SPLITS}
    for split, _, lvl in results:
        counts[split][level_name(lvl)] += 1
    write_json(root / "synthbci.json", {
        "generator": "SynthBCI",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "size": int(size),
        "counts": counts,
        "displacement": displacement_name(asdict(p)),
        "params": asdict(p),
    })
    seconds = time.perf_counter() - t0
    return {
        "out": str(root),
        "seed": seed,
        "size": int(size),
        "counts": counts,
        "pairs": len(results),
        "seconds": seconds,
        "pairs_per_s": len(results) / seconds if seconds > 0 else float("inf"),
    }

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
The defaults were calibrated against real images (``scripts/calibrate_synth.py``,
``docs/synthbci.md``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .. import HER2_LEVELS
from ..stain.matrices import stain_matrix_from_vectors
from . import synth_layers as L

SPLITS: tuple[str, ...] = ("train", "test")
GENERATOR_VERSION = 2  # 2: membrane arcs cover exactly the asked fraction of the circumference


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MembranePattern:
    """DAB staining of tumour-cell membranes for one HER2 level (drawn per slide, then per cell).

    A slide stains ``positive_fraction`` (uniform range) of its tumour cells with membrane OD
    ``intensity`` and arc ``completeness`` (fraction of the circumference, 1 = circumferential),
    each drawn per cell from its range. Of the remaining cells, ``faint_fraction`` get a faint,
    incomplete rim (OD 0.05–0.2, 20–60 % of the circumference). ``cytoplasm`` is diffuse
    cytoplasmic DAB as a fraction of the membrane OD.
    """

    positive_fraction: tuple[float, float]
    intensity: tuple[float, float]
    completeness: tuple[float, float]
    faint_fraction: float = 0.0
    cytoplasm: float = 0.0


#: Clinical HER2 scoring (ASCO/CAP) rendered as membrane patterns, index = level.
#: 0: no staining, or faint incomplete staining in ≤ 10 % of tumour cells;
#: 1+: faint, barely perceptible, incomplete staining in > 10 %;
#: 2+: weak to moderate complete staining in > 10 %;
#: 3+: strong, complete, circumferential staining in > 10 % (here most cells).
HER2_PATTERNS: tuple[MembranePattern, ...] = (
    MembranePattern((0.0, 0.08), (0.08, 0.2), (0.2, 0.5)),
    MembranePattern((0.3, 0.8), (0.2, 0.45), (0.3, 0.7)),
    MembranePattern((0.35, 0.75), (0.7, 1.2), (0.85, 1.0), faint_fraction=0.5, cytoplasm=0.03),
    MembranePattern((0.8, 1.0), (2.4, 3.2), (1.0, 1.0), faint_fraction=0.5, cytoplasm=0.06),
)


@dataclass(frozen=True)
class SynthParams:
    """Every knob of the generator. Lengths are pixels at ``zoom = 1`` (about 1 µm per pixel, the
    scale of BCI's 1024-px tiles resized to 512); optical densities are natural-log OD per unit stain
    vector. ``*_per_level`` terms are added once per HER2 level step (0 → 3+)."""

    zoom: float = 1.0

    # Tissue layout
    architecture_weights: tuple[float, float, float] = (0.5, 0.3, 0.2)  # nests, cords, sheet
    nest_scale: float = 70.0
    tumour_fraction: float = 0.32
    tumour_fraction_per_level: float = 0.09
    tumour_fraction_jitter: float = 0.12
    lumen_probability: float = 0.35
    lumen_fraction: tuple[float, float] = (0.03, 0.10)
    fat_probability: float = 0.2
    fat_fraction: tuple[float, float] = (0.2, 0.6)
    fat_cell_spacing: float = 30.0
    background_probability: float = 0.2
    background_fraction: tuple[float, float] = (0.05, 0.3)

    # Tumour cells and nuclei (the H&E's cue of the level)
    cell_spacing: float = 11.5
    cell_spacing_per_level: float = 0.6
    nucleus_radius: float = 3.2
    nucleus_radius_per_level: float = 0.45
    nucleus_radius_jitter: float = 0.08  # per slide, relative
    pleomorphism: float = 0.08  # per-cell radius spread (log-normal σ)
    pleomorphism_per_level: float = 0.05
    aspect_spread: float = 0.15
    aspect_spread_per_level: float = 0.08
    lobe_per_level: float = 0.04
    nucleolus_probability: float = 0.05
    nucleolus_probability_per_level: float = 0.15
    chromatin_texture: float = 0.35

    # Stromal cells
    stroma_cell_spacing: float = 17.0
    stroma_cell_keep: float = 0.5
    lymphocyte_fraction: float = 0.25
    fibre_period: float = 5.0

    # Stain vectors (unit OD colours; H&E ones from Macenko estimates on real H&E tiles, the IHC
    # ones from the real IHC image, see docs/synthbci.md) and their per-slide jitter.
    he_h_vector: tuple[float, float, float] = (0.54, 0.75, 0.40)
    he_e_vector: tuple[float, float, float] = (0.21, 0.87, 0.45)
    ihc_h_vector: tuple[float, float, float] = (0.67, 0.65, 0.36)
    ihc_dab_vector: tuple[float, float, float] = (0.27, 0.50, 0.82)
    stain_vector_jitter: float = 0.04
    intensity_jitter: float = 0.12  # log-normal σ of each stain's amount per slide
    white: tuple[float, float, float] = (0.955, 0.95, 0.95)
    white_jitter: float = 0.01

    # H&E concentrations (OD)
    nucleus_h: float = 1.05
    nucleus_h_per_level: float = 0.06
    cytoplasm_h: float = 0.32
    cytoplasm_e: float = 0.50
    stroma_h: float = 0.10
    stroma_e: float = 0.42
    fibre_e: float = 0.50
    lumen_e: float = 0.05
    fat_e: float = 0.45
    thickness_variation: float = 0.10  # smooth relative variation of section thickness

    # IHC concentrations (OD) and the HER2 patterns
    ihc_nucleus_h: float = 0.55  # relative to the H&E's nuclei: the counterstain is lighter
    ihc_cytoplasm_h: float = 0.10
    ihc_stroma_h: float = 0.07
    dab_nonspecific: float = 0.03
    membrane_blur: float = 0.8
    her2_patterns: tuple[MembranePattern, ...] = HER2_PATTERNS

    # Adjacent section: displacement, deformation, re-cut cells
    max_shift: float = 6.0
    max_rotation_deg: float = 2.0
    warp_amplitude: float = 1.5
    warp_scale: float = 64.0
    cell_jitter: float = 0.8  # px, centre movement of each cell
    nucleus_size_jitter: float = 0.10  # per-cell relative radius change (another cut)
    nucleus_dropout: float = 0.08  # fraction of nuclei not cut in the other section

    # Scanner
    blur: float = 0.6
    noise: float = 0.008


@dataclass(frozen=True)
class Slide:
    """Parameters drawn once per pair (see :func:`sample_slide`)."""

    level: int
    architecture: str
    tumour_fraction: float
    lumen_fraction: float
    fat_fraction: float
    background_fraction: float
    cell_spacing: float
    nucleus_radius: float
    pleomorphism: float
    aspect_spread: float
    lobe: float
    nucleolus_probability: float
    nucleus_h: float
    fibre_angle: float
    he_matrix: np.ndarray  # [3, 3] rows H, E, DAB
    ihc_matrix: np.ndarray
    he_gain: np.ndarray  # [3] per-stain amount
    ihc_gain: np.ndarray
    he_white: np.ndarray  # [3]
    ihc_white: np.ndarray
    positive_fraction: float


def level_name(level: int) -> str:
    """``0..3`` → ``'0', '1+', '2+', '3+'``."""
    return HER2_LEVELS[level]


def _uniform(rng: np.random.Generator, lo_hi: Sequence[float]) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def _jitter_vector(rng: np.random.Generator, v: Sequence[float], sigma: float) -> np.ndarray:
    u = np.abs(np.asarray(v, dtype=np.float64) + rng.normal(0.0, sigma, 3))
    return u / np.linalg.norm(u)


def sample_slide(rng: np.random.Generator, level: int, p: SynthParams) -> Slide:
    """Draw the per-pair (per-slide) parameters for HER2 ``level`` (0..3)."""
    z = p.zoom
    w = np.asarray(p.architecture_weights, dtype=np.float64)
    arch = ("nests", "cords", "sheet")[int(rng.choice(3, p=w / w.sum()))]
    tf = p.tumour_fraction + p.tumour_fraction_per_level * level + rng.uniform(-1, 1) * p.tumour_fraction_jitter
    he_h = _jitter_vector(rng, p.he_h_vector, p.stain_vector_jitter)
    he_e = _jitter_vector(rng, p.he_e_vector, p.stain_vector_jitter)
    ihc_h = _jitter_vector(rng, p.ihc_h_vector, p.stain_vector_jitter)
    ihc_d = _jitter_vector(rng, p.ihc_dab_vector, p.stain_vector_jitter)
    pattern = p.her2_patterns[level]
    return Slide(
        level=level,
        architecture=arch,
        tumour_fraction=float(np.clip(tf, 0.08, 0.9)),
        lumen_fraction=_uniform(rng, p.lumen_fraction) if rng.random() < p.lumen_probability else 0.0,
        fat_fraction=_uniform(rng, p.fat_fraction) if rng.random() < p.fat_probability else 0.0,
        background_fraction=_uniform(rng, p.background_fraction) if rng.random() < p.background_probability else 0.0,
        cell_spacing=(p.cell_spacing + p.cell_spacing_per_level * level) * z,
        nucleus_radius=(p.nucleus_radius + p.nucleus_radius_per_level * level)
        * z * float(np.exp(rng.normal(0.0, p.nucleus_radius_jitter))),
        pleomorphism=p.pleomorphism + p.pleomorphism_per_level * level,
        aspect_spread=p.aspect_spread + p.aspect_spread_per_level * level,
        lobe=p.lobe_per_level * level,
        nucleolus_probability=min(1.0, p.nucleolus_probability + p.nucleolus_probability_per_level * level),
        nucleus_h=p.nucleus_h + p.nucleus_h_per_level * level,
        fibre_angle=float(rng.uniform(0, np.pi)),
        he_matrix=stain_matrix_from_vectors(h=he_h, e=he_e),
        ihc_matrix=stain_matrix_from_vectors(h=ihc_h, dab=ihc_d),
        he_gain=np.exp(rng.normal(0.0, p.intensity_jitter, 3)),
        ihc_gain=np.exp(rng.normal(0.0, p.intensity_jitter, 3)),
        he_white=np.clip(np.asarray(p.white) + rng.normal(0.0, p.white_jitter, 3), 0.8, 1.0),
        ihc_white=np.clip(np.asarray(p.white) + rng.normal(0.0, p.white_jitter, 3), 0.8, 1.0),
        positive_fraction=_uniform(rng, pattern.positive_fraction),
    )


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cells:
    """Tumour and stromal cells of one section on the canvas."""

    tumour: L.Nuclei
    tumour_cell: np.ndarray  # [H, W] int32 Voronoi index, -1 outside the tumour epithelium
    stroma: L.Nuclei
    stroma_cell: np.ndarray  # [H, W] int32, -1 outside the stroma


def _tumour_nuclei(rng: np.random.Generator, centres: np.ndarray, s: Slide) -> L.Nuclei:
    n = len(centres)
    r = s.nucleus_radius * np.exp(rng.normal(0.0, s.pleomorphism, n))
    r = np.clip(r, 0.5 * s.nucleus_radius, 1.8 * s.nucleus_radius)
    return L.Nuclei(
        centre=centres + rng.normal(0.0, 0.1 * s.cell_spacing, (n, 2)),
        radius=r,
        aspect=1.0 + np.abs(rng.normal(0.0, s.aspect_spread, n)),
        angle=rng.uniform(0, np.pi, n),
        lobe=s.lobe * rng.uniform(0, 1, n),
        lobe_phase=rng.uniform(0, 2 * np.pi, n),
        stain=s.nucleus_h * np.exp(rng.normal(0.0, 0.12 + 0.03 * s.level, n)),
        nucleolus=np.where(rng.random(n) < s.nucleolus_probability, 0.5, 0.0),
    )


def _stroma_nuclei(rng: np.random.Generator, centres: np.ndarray, s: Slide, p: SynthParams) -> L.Nuclei:
    n = len(centres)
    lymph = rng.random(n) < p.lymphocyte_fraction
    z = p.zoom
    return L.Nuclei(
        centre=centres,
        radius=np.where(lymph, 2.2 * z, 2.6 * z) * np.exp(rng.normal(0.0, 0.1, n)),
        aspect=np.where(lymph, 1.1, rng.uniform(3.0, 5.5, n)),
        angle=s.fibre_angle + rng.normal(0.0, 0.25, n),
        lobe=np.zeros(n),
        lobe_phase=np.zeros(n),
        stain=np.where(lymph, 1.7, 1.2) * np.exp(rng.normal(0.0, 0.1, n)),
        nucleolus=np.zeros(n),
    )


def place_cells(rng: np.random.Generator, tissue: np.ndarray, s: Slide, p: SynthParams) -> Cells:
    """Seed tumour cells (packed, jittered hexagonal grid) in the epithelium and sparse
    fibroblasts and lymphocytes in the stroma; tessellate each population by Voronoi."""
    shape = tissue.shape
    epithelium = tissue == L.TUMOUR
    stroma = tissue == L.STROMA
    pts = L.jittered_grid(rng, shape, s.cell_spacing, 0.3)
    pts = pts[L.points_in(pts, epithelium)]
    spts = L.jittered_grid(rng, shape, p.stroma_cell_spacing * p.zoom, 0.45)
    spts = spts[L.points_in(spts, stroma) & (rng.random(len(spts)) < p.stroma_cell_keep)]
    return _tessellate(_tumour_nuclei(rng, pts, s), epithelium, _stroma_nuclei(rng, spts, s, p), stroma)


def _tessellate(tumour: L.Nuclei, epithelium: np.ndarray, stroma: L.Nuclei, stroma_mask: np.ndarray) -> Cells:
    # Cells are tessellated from their *nucleus* centres: in the other section the nucleus and the
    # cell move together.
    tc = L.voronoi(epithelium.shape, tumour.centre)
    sc = L.voronoi(stroma_mask.shape, stroma.centre)
    return Cells(tumour, np.where(epithelium, tc, -1), stroma, np.where(stroma_mask, sc, -1))


def adjacent_cells(rng: np.random.Generator, cells: Cells, tissue: np.ndarray, p: SynthParams) -> Cells:
    """The same cells in the adjacent section: centres moved by ``cell_jitter`` px, nuclei cut at
    another level (radius changed, some not cut at all)."""

    def recut(n: L.Nuclei) -> L.Nuclei:
        k = len(n.radius)
        return L.Nuclei(
            centre=n.centre + rng.normal(0.0, p.cell_jitter * p.zoom, (k, 2)),
            radius=n.radius * np.exp(rng.normal(0.0, p.nucleus_size_jitter, k)),
            aspect=n.aspect,
            angle=n.angle + rng.normal(0.0, 0.1, k),
            lobe=n.lobe,
            lobe_phase=n.lobe_phase,
            stain=n.stain * (rng.random(k) >= p.nucleus_dropout),
            nucleolus=n.nucleolus,
        )

    return _tessellate(recut(cells.tumour), tissue == L.TUMOUR, recut(cells.stroma), tissue == L.STROMA)


# --------------------------------------------------------------------------------------------
# Concentration maps
# --------------------------------------------------------------------------------------------

def nuclear_haematoxylin(rng: np.random.Generator, cells: Cells, p: SynthParams) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin OD of all nuclei ``[H, W]`` and the nucleus mask ``[H, W]`` (both float32)."""
    chromatin = L.smooth_field(rng, cells.tumour_cell.shape, 2.0 * p.zoom)
    h = np.zeros(cells.tumour_cell.shape, np.float32)
    mask = np.zeros_like(h)
    for nuc, cell in ((cells.tumour, cells.tumour_cell), (cells.stroma, cells.stroma_cell)):
        hk, mk = L.nuclei_layer(cell, nuc, chromatin, p.chromatin_texture, softness=0.7 * p.zoom)
        h += hk
        mask = np.maximum(mask, mk)
    return h, mask


def fat_borders(rng: np.random.Generator, tissue: np.ndarray, p: SynthParams) -> np.ndarray:
    """Thin adipocyte membranes ``[H, W]`` (float32 in [0, 1]) inside the fat areas."""
    fat = tissue == L.FAT
    if not fat.any():
        return np.zeros(tissue.shape, np.float32)
    pts = L.jittered_grid(rng, tissue.shape, p.fat_cell_spacing * p.zoom, 0.35)
    border = L.cell_borders(L.voronoi(tissue.shape, pts), fat)
    return ndi.gaussian_filter(border.astype(np.float32), 0.5 * p.zoom)


def he_concentrations(
    rng: np.random.Generator, tissue: np.ndarray, cells: Cells, fibres: np.ndarray, fat: np.ndarray,
    s: Slide, p: SynthParams,
) -> tuple[np.ndarray, np.ndarray]:
    """H&E stain amounts ``[3, H, W]`` (H, E, DAB = 0) and the nucleus mask ``[H, W]``."""
    nuc_h, nuc = nuclear_haematoxylin(rng, cells, p)
    epi = (tissue == L.TUMOUR).astype(np.float32)
    stroma = (tissue == L.STROMA).astype(np.float32)
    n_cells = max(len(cells.tumour.radius), 1)
    cell_tone = 1.0 + 0.12 * rng.standard_normal(n_cells).astype(np.float32)  # cytoplasm varies per cell
    tone = cell_tone[np.maximum(cells.tumour_cell, 0)]
    borders = ndi.gaussian_filter(L.cell_borders(cells.tumour_cell, tissue == L.TUMOUR).astype(np.float32), 0.6 * p.zoom)
    h = nuc_h + p.cytoplasm_h * epi * (1 - nuc) + p.stroma_h * stroma
    e = (
        p.cytoplasm_e * epi * tone * (1 - 0.6 * nuc)
        + 0.12 * borders * epi
        + stroma * (p.stroma_e * (1 - 0.7 * nuc) + p.fibre_e * fibres)
        + p.lumen_e * (tissue == L.LUMEN)
        + p.fat_e * fat
        + 0.15 * nuc
    )
    thick = 1.0 + p.thickness_variation * L.smooth_field(rng, tissue.shape, 80.0 * p.zoom)
    conc = np.stack([h * thick * s.he_gain[0], e * thick * s.he_gain[1], np.zeros_like(h)])
    return conc, nuc


def her2_membranes(rng: np.random.Generator, tissue: np.ndarray, cells: Cells, s: Slide, p: SynthParams) -> tuple[np.ndarray, float]:
    """DAB OD ``[H, W]`` of the HER2 pattern of ``s.level`` and the realised positive fraction."""
    pattern = p.her2_patterns[s.level]
    n = len(cells.tumour.radius)
    if n == 0:
        return np.zeros(tissue.shape, np.float32), 0.0
    positive = rng.random(n) < s.positive_fraction
    faint = ~positive & (rng.random(n) < pattern.faint_fraction)
    strength = np.where(positive, rng.uniform(*pattern.intensity, n), 0.0)
    strength = np.where(faint, rng.uniform(0.05, 0.2, n), strength)
    complete = np.where(positive, rng.uniform(*pattern.completeness, n), rng.uniform(0.2, 0.6, n))
    arc = L.membrane_arcs(
        cells.tumour_cell, L.cell_borders(cells.tumour_cell, tissue == L.TUMOUR),
        cells.tumour.centre, complete, rng.uniform(0, 2 * np.pi, n),
    )
    idx = np.maximum(cells.tumour_cell, 0)
    granular = 0.75 + 0.25 * L.smooth_field(rng, tissue.shape, 1.5 * p.zoom)
    dab = ndi.gaussian_filter(arc * strength[idx] * granular, p.membrane_blur * p.zoom)
    dab += pattern.cytoplasm * strength[idx] * (cells.tumour_cell >= 0)
    return dab.astype(np.float32), float(positive.mean())


def ihc_concentrations(
    rng: np.random.Generator, tissue: np.ndarray, cells: Cells, fibres: np.ndarray, fat: np.ndarray,
    s: Slide, p: SynthParams,
) -> tuple[np.ndarray, float]:
    """IHC stain amounts ``[3, H, W]`` (H, E = 0, DAB) and the realised positive fraction."""
    nuc_h, nuc = nuclear_haematoxylin(rng, cells, p)
    epi = (tissue == L.TUMOUR).astype(np.float32)
    stroma = (tissue == L.STROMA).astype(np.float32)
    dab, positive = her2_membranes(rng, tissue, cells, s, p)
    h = (
        p.ihc_nucleus_h * nuc_h
        + p.ihc_cytoplasm_h * epi * (1 - nuc)
        + p.ihc_stroma_h * (stroma * (0.5 + fibres) + 2.0 * fat)  # counterstain tints fibres and fat-cell membranes
    )
    # Weak non-specific DAB on cellular tissue (not on glass, lumina or fat).
    dab = dab + p.dab_nonspecific * (epi + stroma) * (1.0 + 0.5 * L.smooth_field(rng, tissue.shape, 30.0 * p.zoom))
    thick = 1.0 + p.thickness_variation * L.smooth_field(rng, tissue.shape, 80.0 * p.zoom)
    conc = np.stack([h * thick * s.ihc_gain[0], np.zeros_like(h), np.maximum(dab, 0) * thick * s.ihc_gain[2]])
    return conc, positive


# --------------------------------------------------------------------------------------------
# One pair
# --------------------------------------------------------------------------------------------

def canvas_padding(size: int, p: SynthParams) -> int:
    """Margin (px) around the field so that the displaced IHC never samples outside the canvas."""
    rot = abs(math.sin(math.radians(p.max_rotation_deg))) * size * math.sqrt(0.5)
    return math.ceil((p.max_shift + 4 * p.warp_amplitude) * p.zoom + rot + 2)


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
    he_rgb = L.beer_lambert(he_conc[:, crop[0], crop[1]].transpose(1, 2, 0), s.he_matrix, s.he_white)
    ihc_c = np.zeros((3, size, size), np.float32)
    ihc_c[[0, 2]] = L.warp_maps(ihc_conc[[0, 2]], flow, pad)  # the IHC has no eosin
    ihc_rgb = L.beer_lambert(ihc_c.transpose(1, 2, 0), s.ihc_matrix, s.ihc_white)
    he = L.scanner(rng, he_rgb, p.blur * p.zoom, p.noise)
    ihc = L.scanner(rng, ihc_rgb, p.blur * p.zoom, p.noise)

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
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _render_job(job: _Job) -> tuple[str, str, int]:
    from ..io import write_bytes

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
    from ..io import write_json

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
        import multiprocessing as mp

        # fork shares the already-imported modules (start-up is most of a small run's time)
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(workers) as pool:
            for r in pool.imap_unordered(_render_job, jobs, chunksize=max(1, min(16, len(jobs) // (4 * workers)))):
                results.append(r)
                if progress:
                    progress(len(results), len(jobs))
    counts = {split: {name: 0 for name in HER2_LEVELS} for split in SPLITS}
    for split, _, lvl in results:
        counts[split][level_name(lvl)] += 1
    write_json(root / "synthbci.json", {
        "generator": "SynthBCI",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "size": int(size),
        "counts": counts,
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

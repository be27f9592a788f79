"""SynthBCI cells and stain concentration maps of one field: cell placement (a Voronoi tessellation of
jittered seeds), the adjacent section's re-cut cells, and the H&E / IHC optical-density maps.

See :mod:`derestainer.data.synth` for the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from derestainer.data import synth_layers as L
from derestainer.data.synth_params import Slide, SynthParams

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

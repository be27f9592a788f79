"""SynthBCI parameters: every knob of the generator (:class:`SynthParams`), the clinical HER2 membrane
patterns per level (:data:`HER2_PATTERNS`), and the per-slide draw (:func:`sample_slide`).

See :mod:`derestainer.data.synth` for the pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from derestainer.stain.matrices import stain_matrix_from_vectors

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


#: How far the IHC section is displaced from the H&E (SynthParams fields ``max_shift`` px per axis,
#: ``max_rotation_deg``, ``warp_amplitude`` px). ``adjacent`` (the default): an adjacent section as
#: scanned, unregistered, with offsets up to a nucleus diameter, as in BCI. ``registered``: the same
#: pair after registration, with a residual offset of at most 1 px. With the same seed both draw the
#: same tissue and stains (the canvas margin is the ``adjacent`` one); only the displacement differs.
DISPLACEMENTS: dict[str, dict[str, float]] = {
    "adjacent": {"max_shift": 6.0, "max_rotation_deg": 2.0, "warp_amplitude": 1.5},
    "registered": {"max_shift": 1.0, "max_rotation_deg": 0.5, "warp_amplitude": 0.5},
}


def with_displacement(p: SynthParams, name: str) -> SynthParams:
    """``p`` with the displacement preset ``name`` (a key of :data:`DISPLACEMENTS`).

    Raises:
        ValueError: unknown name.
    """
    if name not in DISPLACEMENTS:
        raise ValueError(f"unknown displacement {name!r}; choose one of {', '.join(DISPLACEMENTS)}")
    d = DISPLACEMENTS[name]
    return replace(p, max_shift=d["max_shift"], max_rotation_deg=d["max_rotation_deg"],
                   warp_amplitude=d["warp_amplitude"])


def displacement_name(params: Mapping[str, Any]) -> str | None:
    """The :data:`DISPLACEMENTS` preset that ``params`` (SynthParams fields, e.g. from synthbci.json) uses, or None."""
    for name, fields in DISPLACEMENTS.items():
        if all(params.get(k) == v for k, v in fields.items()):
            return name
    return None


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

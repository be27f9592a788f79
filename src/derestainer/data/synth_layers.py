"""The layers of the SynthBCI generator, one small pure function each (used by :mod:`.synth`).

Everything works on a square *canvas* in tissue coordinates (pixels); all functions are vectorised
NumPy/SciPy (no per-pixel Python loops).  Randomness always comes from an explicit
``np.random.Generator`` so that one seed fixes a whole image pair.

Concentrations are optical densities (natural logarithm) per unit stain vector, so that
``rgb = white · exp(−Σ_k c_k · v_k)`` (Beer–Lambert).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi

from derestainer.stain.matrices import LOG_ADJUST
from derestainer.stain.numpy_ops import hed_to_rgb_np

#: Tissue classes of the layout map.
BACKGROUND, STROMA, TUMOUR, LUMEN, FAT = 0, 1, 2, 3, 4


# --------------------------------------------------------------------------------------------
# Random fields
# --------------------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def pixel_grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates ``(yy, xx)``, each float32 ``[H, W]`` (cached, read-only)."""
    return _grid(int(shape[0]), int(shape[1]))


@lru_cache(maxsize=32)
def _linear_weights(n: int, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Left neighbour index and weight of the right one, to interpolate a coarse grid of spacing
    ``step`` px (offset by 2 cells) linearly at ``n`` pixels."""
    t = np.arange(n, dtype=np.float64) / step + 2.0
    i0 = np.floor(t).astype(np.intp)
    frac = (t - i0).astype(np.float32)
    i0.flags.writeable = False
    frac.flags.writeable = False
    return i0, frac


def smooth_field(
    rng: np.random.Generator,
    shape: tuple[int, int],
    scale: float,
    stretch: float = 1.0,
    angle: float | None = None,
    bend: np.ndarray | None = None,
) -> np.ndarray:
    """Smooth Gaussian random field ``[H, W]`` (float32, zero mean, unit standard deviation).

    White noise on a coarse grid (spacing ``scale/2`` px) smoothed by a Gaussian of one grid cell
    and brought to the pixels, so that its correlation length is about ``scale`` px. ``stretch > 1``
    makes it anisotropic: correlation ``scale·stretch`` along direction ``angle`` (radians from the
    x axis), ``scale`` across — streaks, cords and fibres come from this. ``bend`` (``[H, W]`` px,
    rotated fields only) shifts the field across its direction, which makes streaks wavy.

    Fine axis-aligned fields filter full-resolution noise; coarse ones interpolate the smoothed
    coarse grid separably; rotated ones bilinearly at rotated coordinates.
    """
    h, w = shape
    step_a = max(scale * stretch / 2.0, 0.5)  # along ``angle`` (x when unrotated)
    step_c = max(scale / 2.0, 0.5)
    if angle is None and min(step_a, step_c) < 4.0:
        # Fine texture: filtering full-resolution noise is cheaper than large matrix products.
        noise = rng.standard_normal((h, w), dtype=np.float32)
        f = ndi.gaussian_filter(noise, (step_c, step_a), mode="wrap")
    elif angle is None:
        # Separable linear interpolation by gathers (no BLAS: large matrix products would go
        # multi-threaded and stall when worker processes share the cores).
        iy, fy = _linear_weights(int(h), float(step_c))
        ix, fx = _linear_weights(int(w), float(step_a))
        coarse = rng.standard_normal((int(iy[-1]) + 4, int(ix[-1]) + 4), dtype=np.float32)
        coarse = ndi.gaussian_filter(coarse, 1.0, mode="wrap")
        rows = coarse[iy] * (1.0 - fy)[:, None] + coarse[iy + 1] * fy[:, None]
        f = rows[:, ix] * (1.0 - fx) + rows[:, ix + 1] * fx
    else:
        yy, xx = pixel_grid(shape)
        c, s = np.cos(angle), np.sin(angle)
        along = c * xx + s * yy
        across = -s * xx + c * yy
        if bend is not None:
            across = across + bend
        u = (along - along.min()) / step_a + 2.0
        v = (across - across.min()) / step_c + 2.0
        coarse = rng.standard_normal((int(v.max()) + 4, int(u.max()) + 4), dtype=np.float32)
        coarse = ndi.gaussian_filter(coarse, 1.0, mode="wrap")
        f = ndi.map_coordinates(coarse, [v, u], order=1, mode="nearest", prefilter=False)
    f = f.astype(np.float32, copy=False)
    f -= f.mean()
    f /= f.std() + 1e-12
    return f


def top_fraction(field: np.ndarray, fraction: float, where: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the ``fraction`` of pixels (of ``where``, default all) with the largest values."""
    fraction = float(np.clip(fraction, 0.0, 1.0))
    values = field if where is None else field[where]
    if values.size == 0 or fraction <= 0.0:
        return np.zeros(field.shape, dtype=bool)
    thr = np.quantile(values, 1.0 - fraction)
    out = field > thr if fraction < 1.0 else np.ones(field.shape, dtype=bool)
    return out if where is None else out & where


# --------------------------------------------------------------------------------------------
# Tissue layout
# --------------------------------------------------------------------------------------------

def tissue_layout(
    rng: np.random.Generator,
    shape: tuple[int, int],
    architecture: str,
    tumour_fraction: float,
    nest_scale: float,
    cell_spacing: float,
    lumen_fraction: float,
    fat_fraction: float,
    background_fraction: float,
) -> np.ndarray:
    """Tissue class map ``[H, W]`` (uint8: BACKGROUND, STROMA, TUMOUR, LUMEN, FAT).

    ``architecture`` is ``'nests'`` (rounded islands), ``'cords'`` (elongated trabeculae along a
    random direction) or ``'sheet'`` (large confluent areas). The tumour occupies
    ``tumour_fraction`` of the tissue; glandular lumina (``lumen_fraction`` of the tumour) are holes
    at least one cell deep inside it; fat lobules (``fat_fraction`` of the stroma) and a tissue edge
    (``background_fraction`` of the field, glass) are optional.
    """
    if architecture == "nests":
        f = smooth_field(rng, shape, nest_scale)
    elif architecture == "cords":
        f = smooth_field(rng, shape, nest_scale * 0.45, stretch=4.0, angle=rng.uniform(0, np.pi))
    elif architecture == "sheet":
        f = smooth_field(rng, shape, nest_scale * 2.0)
    else:
        raise ValueError(f"unknown architecture {architecture!r}; expected nests, cords or sheet")
    # Ragged, cell-sized irregularity of the nest borders.
    f = f + 0.25 * smooth_field(rng, shape, cell_spacing)
    labels = np.full(shape, STROMA, dtype=np.uint8)
    tumour = top_fraction(f, tumour_fraction)
    labels[tumour] = TUMOUR

    if lumen_fraction > 0 and tumour.any():
        depth = ndi.distance_transform_edt(tumour)
        g = smooth_field(rng, shape, cell_spacing * 1.1)
        deep = depth > cell_spacing * 1.2
        if deep.any():
            labels[top_fraction(g, lumen_fraction * tumour.mean() / max(deep.mean(), 1e-6), deep)] = LUMEN

    stroma = labels == STROMA
    if fat_fraction > 0 and stroma.any():
        fat = top_fraction(smooth_field(rng, shape, nest_scale * 1.2), fat_fraction, stroma)
        labels[fat] = FAT

    if background_fraction > 0:
        # A tissue edge: a ramp across a random direction, made ragged by a smooth field.
        yy, xx = pixel_grid(shape)
        a = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(a) * xx + np.sin(a) * yy) / max(shape)
        edge = ramp + 0.08 * smooth_field(rng, shape, nest_scale * 0.7)
        labels[top_fraction(edge, background_fraction)] = BACKGROUND
    return labels


# --------------------------------------------------------------------------------------------
# Cells: seeds, Voronoi tessellation, nuclei
# --------------------------------------------------------------------------------------------

def jittered_grid(rng: np.random.Generator, shape: tuple[int, int], spacing: float, jitter: float) -> np.ndarray:
    """Cell centres ``[N, 2]`` (row, col) on a hexagonal grid of ``spacing`` px, each moved by up to
    ``jitter·spacing``: evenly spread like packed cells, without a visible lattice."""
    h, w = shape
    dy = spacing * np.sqrt(3) / 2
    rows = np.arange(-1, h / dy + 1)
    cols = np.arange(-1, w / spacing + 1)
    r, c = np.meshgrid(rows, cols, indexing="ij")
    pts = np.stack([r * dy, (c + 0.5 * (r % 2)) * spacing], axis=-1).reshape(-1, 2)
    pts = pts + rng.uniform(-jitter, jitter, pts.shape) * spacing
    inside = (pts[:, 0] >= 0) & (pts[:, 0] <= h - 1) & (pts[:, 1] >= 0) & (pts[:, 1] <= w - 1)
    return pts[inside]


def points_in(points: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Boolean ``[N]``: which points (row, col) fall on a True pixel of ``mask``."""
    if len(points) == 0:
        return np.zeros(0, dtype=bool)
    iy = np.clip(np.rint(points[:, 0]).astype(int), 0, mask.shape[0] - 1)
    ix = np.clip(np.rint(points[:, 1]).astype(int), 0, mask.shape[1] - 1)
    return mask[iy, ix]


def voronoi(shape: tuple[int, int], points: np.ndarray) -> np.ndarray:
    """Index ``[H, W]`` (int32) of the nearest point for every pixel; -1 everywhere when no points.

    One exact Euclidean distance transform with nearest-feature indices (scipy.ndimage) gives the
    whole tessellation. Points that round to the same pixel keep the last one.
    """
    if len(points) == 0:
        return np.full(shape, -1, dtype=np.int32)
    iy = np.clip(np.rint(points[:, 0]).astype(int), 0, shape[0] - 1)
    ix = np.clip(np.rint(points[:, 1]).astype(int), 0, shape[1] - 1)
    ids = np.full(shape, -1, dtype=np.int32)
    ids[iy, ix] = np.arange(len(points), dtype=np.int32)
    free = ids < 0
    ny, nx = ndi.distance_transform_edt(free, return_distances=False, return_indices=True)
    return ids[ny, nx]


@dataclass(frozen=True)
class Nuclei:
    """Per-cell nucleus geometry and staining, arrays of length N (one entry per cell)."""

    centre: np.ndarray  # [N, 2] row, col (px)
    radius: np.ndarray  # [N] mean radius (px)
    aspect: np.ndarray  # [N] long/short axis ratio ≥ 1
    angle: np.ndarray  # [N] long-axis direction (rad)
    lobe: np.ndarray  # [N] amplitude of a 3-lobed contour irregularity (0 = ellipse)
    lobe_phase: np.ndarray  # [N]
    stain: np.ndarray  # [N] haematoxylin OD at the nucleus centre (0 = absent)
    nucleolus: np.ndarray  # [N] extra OD of a central nucleolus (0 = none)


def nuclei_layer(
    cell: np.ndarray,
    nuclei: Nuclei,
    chromatin: np.ndarray,
    texture: float,
    softness: float = 0.7,
) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin OD ``[H, W]`` of the nuclei and their soft mask ``[H, W]`` in [0, 1] (float32).

    Every pixel is compared with the nucleus of its own Voronoi cell only, so nuclei never overlap.
    The contour is an ellipse modulated by ``1 + lobe·cos(3φ + phase)`` (ρ = 1 on it);
    ``softness`` (px) is the width of the edge ramp. Inside, the stain is textured by
    ``chromatin`` (a fine random field, weight ``texture``), darker along the nuclear rim and
    at an optional central nucleolus. Nuclei with ``stain == 0`` (not cut) leave no trace.
    The costly trigonometry runs only on pixels that can belong to a nucleus.
    """
    shape = cell.shape
    h = np.zeros(shape, np.float32)
    mask = np.zeros(shape, np.float32)
    if len(nuclei.radius) == 0:
        return h, mask
    yy, xx = pixel_grid(shape)
    cy = nuclei.centre[:, 0].astype(np.float32)
    cx = nuclei.centre[:, 1].astype(np.float32)
    r = nuclei.radius.astype(np.float32)
    sq = np.sqrt(nuclei.aspect).astype(np.float32)
    reach = np.where(nuclei.stain > 0, r * sq * (1.0 + nuclei.lobe) + softness + 1.0, -1.0).astype(np.float32)
    idx = np.maximum(cell, 0)
    dy = yy - cy[idx]
    dx = xx - cx[idx]
    near = (cell >= 0) & (dy * dy + dx * dx < reach[idx] ** 2)
    k = idx[near]
    dy, dx = dy[near], dx[near]
    th = nuclei.angle.astype(np.float32)[k]
    c, s = np.cos(th), np.sin(th)
    u = (c * dx + s * dy) / (r[k] * sq[k])
    v = (-s * dx + c * dy) * (sq[k] / r[k])
    rho = np.sqrt(u * u + v * v)
    phi = np.arctan2(v, u)
    rho /= 1.0 + nuclei.lobe.astype(np.float32)[k] * np.cos(3 * phi + nuclei.lobe_phase.astype(np.float32)[k])
    m = np.clip((1.0 - rho) * r[k] / softness + 0.5, 0.0, 1.0)
    rim = np.exp(-(((rho - 0.9) / 0.15) ** 2))
    nucleolus = nuclei.nucleolus.astype(np.float32)[k] * np.exp(-((rho / 0.22) ** 2))
    stain = nuclei.stain.astype(np.float32)[k] * (1.0 + texture * chromatin[near] + 0.25 * rim) + nucleolus
    mask[near] = m
    h[near] = np.maximum(stain * m, 0.0)
    return h, mask


def cell_borders(cell: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Boolean ``[H, W]``: pixels of ``region`` with a 4-neighbour in another cell or outside it.

    Both sides of a shared border are marked, so every cell owns its side of the membrane.
    """
    key = np.where(region, cell, -2)
    b = np.zeros(cell.shape, dtype=bool)
    d0 = key[1:, :] != key[:-1, :]
    d1 = key[:, 1:] != key[:, :-1]
    b[1:, :] |= d0
    b[:-1, :] |= d0
    b[:, 1:] |= d1
    b[:, :-1] |= d1
    return b & region


def membrane_arcs(
    cell: np.ndarray, border: np.ndarray, centre: np.ndarray, completeness: np.ndarray, arc_angle: np.ndarray
) -> np.ndarray:
    """Boolean ``[H, W]``: border pixels inside their cell's stained arc.

    Cell ``j`` stains the fraction ``completeness[j]`` of its circumference, an arc centred on
    direction ``arc_angle[j]`` as seen from ``centre[j]`` (1 = complete, circumferential).
    """
    out = np.zeros(cell.shape, dtype=bool)
    if len(completeness) == 0:
        return out
    iy, ix = np.nonzero(border & (cell >= 0))  # the angles are needed on the border only
    k = cell[iy, ix]
    phi = np.arctan2(iy - centre[k, 0], ix - centre[k, 1])
    # Inside the arc ⇔ angular distance to its centre ≤ π·completeness ⇔ cos(Δφ) ≥ cos(π·completeness).
    out[iy, ix] = np.cos(phi - arc_angle[k]) >= np.cos(np.pi * completeness[k])
    return out


# --------------------------------------------------------------------------------------------
# Stroma
# --------------------------------------------------------------------------------------------

def collagen_fibres(rng: np.random.Generator, shape: tuple[int, int], angle: float, period: float) -> np.ndarray:
    """Fibre texture ``[H, W]`` in [0, 1]: wavy, broken collagen bundles roughly along ``angle``.

    The zero crossings of an anisotropic random field are long thin curves; a ridge on ``|field|``
    draws them as fibres. A smooth sideways bend makes them wavy, and a coarse field modulates the
    bundle density (loose and dense stroma, clefts).
    """
    bend = 2.5 * period * smooth_field(rng, shape, 12.0 * period)
    fine = smooth_field(rng, shape, period, stretch=5.0, angle=angle, bend=bend)
    density = smooth_field(rng, shape, 8.0 * period)
    fib = np.exp(-((fine / 0.5) ** 2)) * np.clip(0.65 + 0.35 * density, 0.0, 1.0)
    return fib.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Geometry of the adjacent section
# --------------------------------------------------------------------------------------------

def section_warp(
    rng: np.random.Generator,
    size: int,
    shift: np.ndarray,
    rotation: float,
    amplitude: float,
    scale: float,
) -> np.ndarray:
    """Displacement ``[2, S, S]`` (float32, rows then cols): IHC pixel ``p`` shows the tissue that
    the H&E shows at ``p + flow(p)``.

    A rigid part (``shift`` px, ``rotation`` rad about the centre) plus a smooth elastic part of
    about ``amplitude`` px with correlation length ``scale`` px — what cutting, floating and
    mounting an adjacent section does.
    """
    yy, xx = pixel_grid((size, size))
    cy = cx = (size - 1) / 2.0
    c, s = np.cos(rotation), np.sin(rotation)
    ry = cy + s * (xx - cx) + c * (yy - cy)
    rx = cx + c * (xx - cx) - s * (yy - cy)
    fy = ry - yy + shift[0] + amplitude * smooth_field(rng, (size, size), scale)
    fx = rx - xx + shift[1] + amplitude * smooth_field(rng, (size, size), scale)
    return np.stack([fy, fx]).astype(np.float32)


def warp_maps(maps: np.ndarray, flow: np.ndarray, pad: int) -> np.ndarray:
    """Resample canvas maps ``[C, H, W]`` at ``p + flow(p) + pad`` → ``[C, S, S]`` (bilinear)."""
    size = flow.shape[1]
    yy, xx = pixel_grid((size, size))
    coords = [yy + flow[0] + pad, xx + flow[1] + pad]
    return np.stack([ndi.map_coordinates(m, coords, order=1, mode="nearest", prefilter=False) for m in maps])


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

def beer_lambert(conc: np.ndarray, rgb_from_stain: np.ndarray, white: np.ndarray) -> np.ndarray:
    """Transmitted light ``[H, W, 3]`` in [0, 1] from concentrations ``[H, W, 3]``.

    ``conc`` is optical density (natural log) per row of ``rgb_from_stain`` (stain OD vectors,
    one per row, as in :mod:`derestainer.stain.matrices`); ``white`` is the light through empty glass.
    Uses :func:`derestainer.stain.hed_to_rgb_np`, whose concentrations are in units of
    ``−log(1e-6)``, hence the rescaling.
    """
    return white * hed_to_rgb_np(conc / -LOG_ADJUST, rgb_from_stain)


def scanner(rng: np.random.Generator, rgb: np.ndarray, blur: float, noise: float) -> np.ndarray:
    """Optical blur (Gaussian, ``blur`` px) and sensor noise (``noise`` in [0, 1] units) → uint8."""
    out = rgb.astype(np.float32)
    if blur > 0:
        out = ndi.gaussian_filter(out, (blur, blur, 0))
    if noise > 0:
        out += np.float32(noise) * rng.standard_normal(out.shape, dtype=np.float32)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)

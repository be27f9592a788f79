"""Tile grids, blending windows and streaming blend accumulators. Pure: numpy only, no I/O, no model.

A slide (or any large image) of ``height × width`` pixels is covered by square tiles of side
``tile`` placed every ``stride = tile − overlap`` pixels; the last row and column of tiles are
moved back so that they end exactly at the image edge (so tiles never hang over the border unless
the image is smaller than one tile). Tile outputs are blended with separable weights

    w_ij(y, x) = wy_i(y) · wx_j(x),

where each 1-D weight is 1 in the tile's interior, falls to 0 across the overlap with its
neighbour by a raised cosine (sin²/cos², a Hann half-window), and is exactly 0 within ``margin``
pixels of an inner tile edge, where zero/reflect padding inside the network makes a tile's output
differ from the whole-image output. The 1-D weights are normalised so that at every pixel they sum
to 1 over the tiles covering it (a partition of unity); because the grid is a Cartesian product,
the 2-D weights then sum to 1 as well, and no per-pixel weight image has to be accumulated.

With ``margin`` ≥ the receptive-field radius of a fully convolutional network, the blended result
equals the network applied to the whole image (tested in ``tests/test_tiling.py``).

:class:`BandBlender` accumulates one row of tiles at a time in a buffer of ``tile`` rows × full
width, and hands back the rows that no later tile touches; memory is O(tile × width), independent
of the image height. (Writing a row-major tiled TIFF needs a full-width band anyway.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np


def grid_positions(length: int, tile: int, overlap: int) -> np.ndarray:
    """Start offsets of tiles covering ``[0, length)`` along one axis.

    Tiles start every ``tile − overlap`` pixels; the last one is shifted back to end exactly at
    ``length`` (its overlap with the previous tile is then larger than ``overlap``). An axis shorter
    than a tile gets a single tile at 0 that hangs over the edge (the caller pads the input).

    Returns:
        int64 ``[n]``, strictly increasing, ``0 ≤ p ≤ max(length − tile, 0)``.
    """
    if tile <= 0 or length <= 0:
        raise ValueError(f"tile ({tile}) and length ({length}) must be positive")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile): got overlap {overlap}, tile {tile}")
    if length <= tile:
        return np.zeros(1, dtype=np.int64)
    stride = tile - overlap
    pos = list(range(0, length - tile, stride))
    pos.append(length - tile)
    return np.asarray(pos, dtype=np.int64)


def raised_cosine_ramp(n: int) -> np.ndarray:
    """Rising half of a Hann window sampled at pixel centres: ``sin²(π/2 · (k + ½)/n)``, k < n.

    ``ramp + ramp[::-1] == 1`` exactly (sin² + cos²), so two tiles cross-fading over the same
    ``n`` pixels sum to one. Values lie strictly inside (0, 1).
    """
    if n <= 0:
        return np.zeros(0, dtype=np.float64)
    t = (np.arange(n, dtype=np.float64) + 0.5) / n
    return np.sin(0.5 * np.pi * t) ** 2


def axis_weights(positions: np.ndarray, tile: int, length: int, overlap: int, margin: int = 0) -> np.ndarray:
    """Normalised 1-D blending weights of each tile along one axis.

    For the boundary between tiles ``i`` and ``i+1`` (overlap zone ``[p_{i+1}, p_i + tile)``), a
    raised-cosine cross-fade of width ``min(overlap, zone) − 2·margin`` is centred in the zone: tile
    ``i`` keeps weight 1 before it and 0 after it, tile ``i+1`` the complement. Sides at the image
    border keep weight 1 up to the edge. The weights of all tiles are then divided by their sum at
    each pixel, which makes them an exact partition of unity even where cross-fades of a short last
    step overlap.

    Args:
        positions: tile starts from :func:`grid_positions`, ``[n]``.
        tile: tile side in pixels.
        length: image length along this axis.
        overlap: nominal overlap (the cross-fade never exceeds it).
        margin: pixels at each inner tile edge given weight exactly 0.

    Returns:
        float64 ``[n, tile]``; ``out[i, k]`` is the weight of pixel ``positions[i] + k`` in tile ``i``
        (pixels beyond ``length`` get weight 0). Summed over tiles, every pixel in ``[0, length)`` gets 1.
    """
    pos = np.asarray(positions, dtype=np.int64)
    n = len(pos)
    if margin < 0:
        raise ValueError(f"margin must be ≥ 0, got {margin}")
    w = np.ones((n, tile), dtype=np.float64)
    for i in range(n - 1):
        zone_start = int(pos[i + 1])
        zone_len = int(pos[i] + tile - pos[i + 1])
        if zone_len <= 0:
            raise ValueError("tiles do not overlap: stride larger than tile")
        fade = min(overlap, zone_len) - 2 * margin
        if fade < 1:
            raise ValueError(
                f"overlap {min(overlap, zone_len)} too small for margin {margin}: need overlap ≥ 2·margin + 1"
            )
        fade_start = zone_start + (zone_len - fade) // 2  # absolute pixel where the cross-fade starts
        ramp = raised_cosine_ramp(fade)
        # Profile of tile i+1 across the boundary, in absolute coordinates [zone_start, zone_end).
        up = np.zeros(zone_len, dtype=np.float64)
        a = fade_start - zone_start
        up[a:a + fade] = ramp
        up[a + fade:] = 1.0
        # Tile i: its local index of zone_start is zone_start - pos[i]; weight 1 - up in the zone.
        lo = zone_start - int(pos[i])
        w[i, lo:lo + zone_len] *= 1.0 - up
        w[i + 1, :zone_len] *= up
    # Pixels past the image end (only when length < tile) carry no weight.
    for i in range(n):
        beyond = int(pos[i]) + tile - length
        if beyond > 0:
            w[i, tile - beyond:] = 0.0
    total = np.zeros(max(length, int(pos[-1]) + tile), dtype=np.float64)
    for i in range(n):
        total[pos[i]:pos[i] + tile] += w[i]
    if np.any(total[:length] <= 0):
        raise ValueError("blending weights vanish somewhere: increase overlap or decrease margin")
    for i in range(n):
        seg = total[pos[i]:pos[i] + tile]
        w[i] = np.divide(w[i], seg, out=np.zeros(tile), where=seg > 0)
    return w


@dataclass(frozen=True)
class TileGrid:
    """Square tiles over an ``height × width`` image with blending weights (see module docstring).

    Attributes:
        height, width: image size in pixels.
        tile: tile side; overlap: nominal overlap between neighbours; margin: zero-weight border
            at inner tile edges (default ``overlap // 4``).
        ys, xs: tile start rows / columns (int64 ``[n_rows]``, ``[n_cols]``).
        wy, wx: normalised 1-D weights ``[n_rows, tile]``, ``[n_cols, tile]`` (float32).
    """

    height: int
    width: int
    tile: int
    overlap: int
    margin: int = -1
    ys: np.ndarray = field(init=False, repr=False)
    xs: np.ndarray = field(init=False, repr=False)
    wy: np.ndarray = field(init=False, repr=False)
    wx: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        margin = self.overlap // 4 if self.margin < 0 else self.margin
        object.__setattr__(self, "margin", margin)
        ys = grid_positions(self.height, self.tile, self.overlap)
        xs = grid_positions(self.width, self.tile, self.overlap)
        object.__setattr__(self, "ys", ys)
        object.__setattr__(self, "xs", xs)
        wy = axis_weights(ys, self.tile, self.height, self.overlap, margin)
        wx = axis_weights(xs, self.tile, self.width, self.overlap, margin)
        object.__setattr__(self, "wy", wy.astype(np.float32))
        object.__setattr__(self, "wx", wx.astype(np.float32))

    @property
    def n_rows(self) -> int:
        return len(self.ys)

    @property
    def n_cols(self) -> int:
        return len(self.xs)

    def __len__(self) -> int:
        return self.n_rows * self.n_cols

    def weight(self, i: int, j: int) -> np.ndarray:
        """2-D weight of tile (row ``i``, column ``j``): float32 ``[tile, tile]``."""
        return self.wy[i][:, None] * self.wx[j][None, :]

    def box(self, i: int, j: int) -> tuple[int, int, int, int]:
        """``(y0, x0, y1, x1)`` of tile (i, j) in image pixels (may extend past the image)."""
        y0, x0 = int(self.ys[i]), int(self.xs[j])
        return y0, x0, y0 + self.tile, x0 + self.tile

    def final_rows(self, i: int) -> tuple[int, int]:
        """Rows ``[start, end)`` that are complete once tile rows ``0..i`` have been blended."""
        start = 0 if i == 0 else int(self.ys[i])
        end = self.height if i == self.n_rows - 1 else int(self.ys[i + 1])
        return start, min(end, self.height)


class BandBlender:
    """Streaming blend accumulator: one row of tiles at a time, full image width.

    Usage::

        blender = BandBlender(grid, channels=3)
        for i in range(grid.n_rows):
            for j in range(grid.n_cols):
                blender.add(j, tile_output_ij)     # float [tile, tile, C]
            rows = blender.finish_row()            # float32 [rows, width, C], rows = final_rows(i)

    The buffer holds ``tile`` rows × ``width`` × ``C`` float32 (the weights need no buffer: they
    are a partition of unity by construction).
    """

    def __init__(self, grid: TileGrid, channels: int = 3, start_row: int = 0) -> None:
        """``start_row`` > 0 starts at that tile row with nothing accumulated from earlier rows
        (used to resume: rows before it are only needed for the rows they finish)."""
        if not 0 <= start_row < grid.n_rows:
            raise ValueError(f"start_row {start_row} outside [0, {grid.n_rows})")
        self.grid = grid
        self.channels = channels
        self.row = start_row
        self._buf = np.zeros((grid.tile, max(grid.width, int(grid.xs[-1]) + grid.tile), channels), dtype=np.float32)

    def add(self, j: int, tile_out: np.ndarray) -> None:
        """Add tile (current row, column ``j``) weighted by its blending window.

        Args:
            tile_out: float ``[tile, tile, C]`` (HWC).
        """
        g = self.grid
        if tile_out.shape != (g.tile, g.tile, self.channels):
            raise ValueError(f"tile output shape {tile_out.shape}, expected {(g.tile, g.tile, self.channels)}")
        x0 = int(g.xs[j])
        self._buf[:, x0:x0 + g.tile] += tile_out * g.weight(self.row, j)[..., None]

    def add_constant(self, j: int, value: float | np.ndarray) -> None:
        """Add a constant tile (e.g. white for background tiles that are not run through the model)."""
        g = self.grid
        x0 = int(g.xs[j])
        val = np.broadcast_to(np.asarray(value, dtype=np.float32), (self.channels,))
        self._buf[:, x0:x0 + g.tile] += g.weight(self.row, j)[..., None] * val

    def finish_row(self) -> np.ndarray:
        """Close the current tile row; return its completed image rows, float32 ``[r, width, C]``."""
        g = self.grid
        if self.row >= g.n_rows:
            raise RuntimeError("all tile rows already finished")
        start, end = g.final_rows(self.row)
        y0 = int(g.ys[self.row])
        out = self._buf[start - y0:end - y0, :g.width].copy()
        if self.row + 1 < g.n_rows:
            shift = int(g.ys[self.row + 1]) - y0
            self._buf[:g.tile - shift] = self._buf[shift:]
            self._buf[g.tile - shift:] = 0.0
        self.row += 1
        return out


def stitch(grid: TileGrid, fn: Callable[[np.ndarray], np.ndarray], image: np.ndarray, pad_value: float = 1.0) -> np.ndarray:
    """Apply ``fn`` tile by tile to ``image`` and blend: the reference use of :class:`BandBlender`.

    Args:
        grid: a grid of the image's size.
        fn: maps a float tile ``[tile, tile, C_in]`` to ``[tile, tile, C_out]``.
        image: ``[H, W, C_in]``; tiles hanging over the edge are padded with ``pad_value``.

    Returns:
        float32 ``[H, W, C_out]``.
    """
    h, w = image.shape[:2]
    if (h, w) != (grid.height, grid.width):
        raise ValueError(f"image is {h}×{w}, grid is {grid.height}×{grid.width}")
    rows: list[np.ndarray] = []
    blender: BandBlender | None = None
    for i in range(grid.n_rows):
        for j in range(grid.n_cols):
            t = extract_tile(image, grid.box(i, j), pad_value)
            out = np.asarray(fn(t), dtype=np.float32)
            if blender is None:
                blender = BandBlender(grid, channels=out.shape[-1])
            blender.add(j, out)
        assert blender is not None
        rows.append(blender.finish_row())
    return np.concatenate(rows, axis=0)


def extract_tile(image: np.ndarray, box: tuple[int, int, int, int], pad_value: float = 1.0) -> np.ndarray:
    """Crop ``box = (y0, x0, y1, x1)`` from ``[H, W, C]``, padding with ``pad_value`` outside the image."""
    y0, x0, y1, x1 = box
    h, w = image.shape[:2]
    crop = image[max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)]
    if crop.shape[:2] == (y1 - y0, x1 - x0):
        return crop
    out = np.full((y1 - y0, x1 - x0) + image.shape[2:], pad_value, dtype=image.dtype)
    out[max(-y0, 0):max(-y0, 0) + crop.shape[0], max(-x0, 0):max(-x0, 0) + crop.shape[1]] = crop
    return out


class HighWater:
    """A count of things held in memory (tiles, rows) and the most ever held at once.

    The thread that takes things is the one that releases them, so the maximum is a property of the
    code path, not of how busy the machine is: it is how streaming code states its memory bound.
    """

    def __init__(self) -> None:
        self.now = 0
        self.max = 0

    def take(self, n: int = 1) -> None:
        self.now += n
        self.max = max(self.max, self.now)

    def release(self, n: int = 1) -> None:
        self.now -= n


def rows_to_tiles(rows: Iterable[np.ndarray], width: int, tile: int, fill: int = 255,
                  held: HighWater | None = None) -> Iterator[np.ndarray]:
    """Re-chunk a stream of full-width row blocks into ``tile × tile`` tiles in row-major order.

    This is what a tiled TIFF writer consumes. Edge tiles are padded to full size with ``fill``
    (white: no dark JPEG ringing at the image border).

    Args:
        rows: blocks ``[r_k, width, C]`` (any heights) in top-to-bottom order.
        width: image width.
        tile: output tile side.
        held: counts the rows waiting to be cut; never more than ``tile − 1`` plus the largest block.

    Yields:
        ``[tile, tile, C]`` arrays of the rows' dtype.
    """
    held = HighWater() if held is None else held
    pending: list[np.ndarray] = []
    n_pending = 0
    for block in rows:
        if block.shape[1] != width:
            raise ValueError(f"row block of width {block.shape[1]}, expected {width}")
        pending.append(block)
        n_pending += block.shape[0]
        held.take(block.shape[0])
        while n_pending >= tile:
            band = np.concatenate(pending, axis=0) if len(pending) > 1 else pending[0]
            yield from _band_tiles(band[:tile], width, tile, fill)
            rest = band[tile:]
            pending = [rest] if len(rest) else []
            n_pending = len(rest)
            held.release(tile)
    if n_pending:
        band = np.concatenate(pending, axis=0)
        yield from _band_tiles(band, width, tile, fill)
        held.release(n_pending)


def _band_tiles(band: np.ndarray, width: int, tile: int, fill: int) -> Iterator[np.ndarray]:
    for x0 in range(0, width, tile):
        t = band[:, x0:x0 + tile]
        if t.shape[0] != tile or t.shape[1] != tile:
            full = np.full((tile, tile) + band.shape[2:], fill, dtype=band.dtype)
            full[:t.shape[0], :t.shape[1]] = t
            t = full
        yield np.ascontiguousarray(t)


def downsample2_rows(rows: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Halve a stream of full-width uint8 row blocks by 2×2 area averaging (odd edges replicated).

    Output size is ``ceil(H/2) × ceil(W/2)``; blocks may have any heights (an odd leftover row is
    carried to the next block).

    Yields:
        uint8 blocks ``[r, ceil(W/2), C]``.
    """
    carry: np.ndarray | None = None
    for block in rows:
        if carry is not None:
            block = np.concatenate([carry, block], axis=0)
            carry = None
        if block.shape[0] % 2:
            carry = block[-1:]
            block = block[:-1]
        if block.shape[0]:
            yield _halve(block)
    if carry is not None:
        yield _halve(np.concatenate([carry, carry], axis=0))


def _halve(block: np.ndarray) -> np.ndarray:
    if block.shape[1] % 2:
        block = np.concatenate([block, block[:, -1:]], axis=1)
    h, w = block.shape[:2]
    b = block.reshape(h // 2, 2, w // 2, 2, -1).astype(np.uint16)
    s = b[:, 0, :, 0] + b[:, 0, :, 1] + b[:, 1, :, 0] + b[:, 1, :, 1]
    return ((s + 2) // 4).astype(np.uint8)


"""Tile grids, blending windows, streaming accumulators and tissue masks (pure numpy; no model files)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from derestainer.inference.tiling import (
    BandBlender,
    TileGrid,
    axis_weights,
    downsample2_rows,
    extract_tile,
    grid_positions,
    raised_cosine_ramp,
    rows_to_tiles,
    stitch,
)
from derestainer.inference.tissue import (
    fill_small_holes,
    remove_small,
    tile_tissue_fraction,
    tissue_mask,
)

# --------------------------------------------------------------------------------------------------
# Grid and weights


@pytest.mark.parametrize("length,tile,overlap", [(100, 32, 8), (33, 32, 8), (20, 32, 8), (1000, 512, 64), (70, 32, 16)])
def test_grid_positions_cover_and_end_at_edge(length: int, tile: int, overlap: int) -> None:
    pos = grid_positions(length, tile, overlap)
    assert pos[0] == 0
    assert np.all(np.diff(pos) > 0) and np.all(np.diff(pos) <= tile - overlap)
    if length >= tile:
        assert pos[-1] + tile == length  # the last tile ends exactly at the edge
    else:
        assert list(pos) == [0]
    covered = np.zeros(length, dtype=bool)
    for p in pos:
        covered[p:p + tile] = True
    assert covered.all()


def test_grid_positions_rejects_bad_overlap() -> None:
    with pytest.raises(ValueError, match="overlap"):
        grid_positions(100, 32, 32)
    with pytest.raises(ValueError):
        grid_positions(100, 32, -1)


def test_raised_cosine_ramp_is_a_crossfade() -> None:
    for n in (1, 2, 7, 64):
        r = raised_cosine_ramp(n)
        np.testing.assert_allclose(r + r[::-1], 1.0, atol=1e-12)
        assert np.all((r > 0) & (r < 1))
        assert np.all(np.diff(r) > 0)


@pytest.mark.parametrize("length,tile,overlap,margin", [
    (100, 32, 8, 2), (33, 32, 8, 2), (20, 32, 8, 2), (1000, 512, 64, 16), (70, 32, 16, 4), (65, 32, 16, 0),
    (129, 64, 32, 8), (64, 64, 16, 4),
])
def test_axis_weights_partition_of_unity_and_margins(length: int, tile: int, overlap: int, margin: int) -> None:
    pos = grid_positions(length, tile, overlap)
    w = axis_weights(pos, tile, length, overlap, margin)
    total = np.zeros(max(length, pos[-1] + tile))
    for p, wi in zip(pos, w):
        total[p:p + tile] += wi
    np.testing.assert_allclose(total[:length], 1.0, atol=1e-12)
    assert np.all(w >= 0)
    for i in range(len(pos)):
        if i > 0:  # inner top/left edge: zero within the margin
            assert np.all(w[i, :margin] == 0)
        else:
            assert w[i, 0] > 0.99  # image border keeps full weight
        if i < len(pos) - 1:
            assert np.all(w[i, tile - margin:] == 0) if margin else True
        elif pos[i] + tile <= length:
            assert w[i, -1] > 0.99


def test_axis_weights_refuse_margin_too_large() -> None:
    with pytest.raises(ValueError, match="margin"):
        axis_weights(grid_positions(100, 32, 8), 32, 100, 8, margin=4)


def test_tile_grid_2d_partition_of_unity() -> None:
    g = TileGrid(97, 131, tile=32, overlap=12)
    acc = np.zeros((g.ys[-1] + 32, g.xs[-1] + 32))
    for i in range(g.n_rows):
        for j in range(g.n_cols):
            y0, x0, y1, x1 = g.box(i, j)
            acc[y0:y1, x0:x1] += g.weight(i, j)
    np.testing.assert_allclose(acc[:97, :131], 1.0, atol=1e-6)
    assert g.margin == 3 and len(g) == g.n_rows * g.n_cols


# --------------------------------------------------------------------------------------------------
# Stitching equals whole-image inference for a fully convolutional network


def _fcn(seed: int = 0) -> nn.Module:
    """3 reflect-padded 3×3 convs (receptive-field radius 3) with eval-mode BatchNorm (per-pixel affine)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(8), nn.LeakyReLU(0.2),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.LeakyReLU(0.2),
        nn.Conv2d(8, 3, 3, padding=1, padding_mode="reflect"), nn.Tanh(),
    )
    bn = net[1]
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _apply(net: nn.Module, hwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))[None].float()
        return net(x)[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("h,w,tile,overlap", [(100, 130, 32, 16), (64, 90, 48, 24), (77, 77, 32, 14)])
def test_stitch_equals_whole_image(rng: np.random.Generator, h: int, w: int, tile: int, overlap: int) -> None:
    net = _fcn()
    img = rng.random((h, w, 3), dtype=np.float32)
    whole = _apply(net, img)
    g = TileGrid(h, w, tile, overlap, margin=overlap // 4)  # margin ≥ 3 = receptive-field radius
    assert g.margin >= 3
    stitched = stitch(g, lambda t: _apply(net, t), img)
    assert stitched.shape == whole.shape
    np.testing.assert_allclose(stitched, whole, atol=1e-5)


def test_stitch_without_margin_shows_padding_effects(rng: np.random.Generator) -> None:
    # The same grid with margin 0 lets tile-edge pixels (computed from reflect padding) into the blend:
    # the result then differs from the whole image, which is why the margin exists.
    net = _fcn()
    img = rng.random((100, 130, 3), dtype=np.float32)
    whole = _apply(net, img)
    g = TileGrid(100, 130, 32, 16, margin=0)
    err = np.abs(stitch(g, lambda t: _apply(net, t), img) - whole).max()
    assert err > 1e-3


def test_band_blender_streams_the_same_rows_and_resumes(rng: np.random.Generator) -> None:
    net = _fcn(1)
    h, w, tile, overlap = 120, 70, 32, 12
    img = rng.random((h, w, 3), dtype=np.float32)
    g = TileGrid(h, w, tile, overlap)
    outs = {(i, j): _apply(net, extract_tile(img, g.box(i, j))) for i in range(g.n_rows) for j in range(g.n_cols)}
    full = stitch(g, lambda t: _apply(net, t), img)

    b = BandBlender(g, 3)
    rows = []
    for i in range(g.n_rows):
        for j in range(g.n_cols):
            b.add(j, outs[i, j])
        band = b.finish_row()
        start, end = g.final_rows(i)
        assert band.shape == (end - start, w, 3)
        rows.append(band)
    np.testing.assert_allclose(np.concatenate(rows), full, atol=1e-6)
    with pytest.raises(RuntimeError):
        b.finish_row()

    # Resume at tile row k: start from the first row reaching ys[k]; rows from k on are exact.
    k = 3
    r0 = int(np.searchsorted(g.ys + tile, g.ys[k], side="right"))
    b2 = BandBlender(g, 3, start_row=r0)
    for i in range(r0, g.n_rows):
        for j in range(g.n_cols):
            b2.add(j, outs[i, j])
        band = b2.finish_row()
        if i >= k:
            np.testing.assert_allclose(band, rows[i], atol=1e-6)


def test_constant_tiles_blend_to_the_constant() -> None:
    g = TileGrid(90, 75, 32, 10)
    b = BandBlender(g, 3)
    rows = []
    for _ in range(g.n_rows):
        for j in range(g.n_cols):
            b.add_constant(j, [0.2, 0.5, 1.0])
        rows.append(b.finish_row())
    out = np.concatenate(rows)
    np.testing.assert_allclose(out, np.broadcast_to([0.2, 0.5, 1.0], out.shape), atol=1e-6)


def test_band_blender_checks_tile_shape() -> None:
    b = BandBlender(TileGrid(64, 64, 32, 8), 3)
    with pytest.raises(ValueError, match="shape"):
        b.add(0, np.zeros((31, 32, 3), np.float32))


def test_extract_tile_pads_outside(rng: np.random.Generator) -> None:
    img = rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)
    t = extract_tile(img, (-2, 8, 14, 16), pad_value=255)
    assert t.shape == (16, 8, 3)
    np.testing.assert_array_equal(t[2:12, :4], img[:, 8:12])
    assert (t[:2] == 255).all() and (t[:, 4:] == 255).all() and (t[12:] == 255).all()


# --------------------------------------------------------------------------------------------------
# Row streams: tiles for the TIFF writer, pyramid reduction


def test_rows_to_tiles_reassembles(rng: np.random.Generator) -> None:
    img = rng.integers(0, 255, (70, 45, 3), dtype=np.uint8)
    blocks = [img[0:7], img[7:40], img[40:41], img[41:70]]  # uneven heights
    tiles = list(rows_to_tiles(iter(blocks), 45, 16, fill=255))
    nty, ntx = -(-70 // 16), -(-45 // 16)
    assert len(tiles) == nty * ntx
    canvas = np.zeros((nty * 16, ntx * 16, 3), np.uint8)
    for k, t in enumerate(tiles):
        assert t.shape == (16, 16, 3)
        r, c = divmod(k, ntx)
        canvas[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = t
    np.testing.assert_array_equal(canvas[:70, :45], img)
    assert (canvas[70:] == 255).all() and (canvas[:, 45:] == 255).all()


@pytest.mark.parametrize("h,w", [(40, 60), (41, 59), (1, 3)])
def test_downsample2_rows_matches_block_mean(rng: np.random.Generator, h: int, w: int) -> None:
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    padded = np.pad(img, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge").astype(np.float64)
    ref = np.floor(padded.reshape((h + 1) // 2, 2, (w + 1) // 2, 2, 3).mean(axis=(1, 3)) + 0.5).astype(np.uint8)
    cuts = sorted({0, h, *rng.integers(0, h, 3).tolist()})
    blocks = [img[a:b] for a, b in itertools.pairwise(cuts) if b > a]
    out = np.concatenate(list(downsample2_rows(iter(blocks))))
    np.testing.assert_array_equal(out, ref)


# --------------------------------------------------------------------------------------------------
# Tissue mask


def _slide_thumb() -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:120, :160]
    img = np.full((120, 160, 3), 242, np.uint8)  # glass
    blob = (yy - 60) ** 2 / 40**2 + (xx - 70) ** 2 / 50**2 < 1
    img[blob] = (200, 120, 170)  # pink tissue
    img[(yy - 60) ** 2 + (xx - 70) ** 2 < 16] = 242  # a small lumen inside it
    img[5:7, 150:152] = (120, 60, 120)  # a speck of dust (4 px)
    img[100:120, 0:20] = 0  # black out-of-scan corner
    return img, blob


def test_tissue_mask_finds_the_blob_and_drops_specks() -> None:
    img, blob = _slide_thumb()
    mask = tissue_mask(img, mpp=10.0)  # 100 µm² per px: speck = 400 µm² < 5000 µm²
    iou = (mask & blob).sum() / (mask | blob).sum()
    assert iou > 0.95
    assert not mask[5:7, 150:152].any()  # speck removed
    assert mask[60, 70]  # lumen filled
    assert not mask[100:120, 0:20].any()  # black is not tissue
    assert not mask[:, 125:145].any()  # glass


def test_tissue_mask_all_tissue_and_all_glass() -> None:
    rng = np.random.default_rng(0)
    tissue = np.clip(rng.normal((200, 110, 170), 25, (64, 64, 3)), 0, 255).astype(np.uint8)
    assert tissue_mask(tissue, 4.0).mean() > 0.95  # Otsu's threshold is clipped: tissue is not split in two
    glass = np.clip(rng.normal(240, 3, (64, 64, 3)), 0, 255).astype(np.uint8)
    assert tissue_mask(glass, 4.0).mean() < 0.01


def test_remove_small_and_fill_holes_brute_force(rng: np.random.Generator) -> None:
    from scipy import ndimage as ndi

    m = rng.random((50, 50)) > 0.7
    out = remove_small(m, 5)
    lab, n = ndi.label(m, structure=np.ones((3, 3)))
    for k in range(1, n + 1):
        comp = lab == k
        assert out[comp].all() == (comp.sum() >= 5)
        assert out[comp].any() == (comp.sum() >= 5)
    ring = np.zeros((20, 20), bool)
    ring[5:15, 5:15] = True
    ring[8:11, 8:11] = False  # 9-px hole
    assert fill_small_holes(ring, 10)[9, 9] and not fill_small_holes(ring, 9)[9, 9]


def test_tile_tissue_fraction_brute_force(rng: np.random.Generator) -> None:
    mask = rng.random((30, 40)) > 0.5
    boxes = np.array([[0, 0, 40, 40], [20, 40, 60, 80], [50, 70, 90, 110], [-20, -20, 20, 20]])
    frac = tile_tissue_fraction(mask, boxes, scale=0.5)  # thumbnail px per image px
    for (y0, x0, y1, x1), f in zip(boxes, frac):
        up = np.zeros((200, 200), bool)
        up[60:120, 60:140] = np.repeat(np.repeat(mask, 2, 0), 2, 1)  # image space, offset 60
        assert f == pytest.approx(up[y0 + 60:y1 + 60, x0 + 60:x1 + 60].mean())

"""Pen ink in the tissue mask: blue, green and black marker are not tissue, and a pen ring does not fill in.

Strokes are drawn 4× supersampled with PIL (anti-aliased coverage) and composited over glass and
tissue, partly translucent. References: the mask of the same thumbnail without ink, and the mask with
``reject_ink=False`` (the behaviour before ink rejection).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage as ndi

from derestainer.data.synth import render_pair
from derestainer.inference.plan import plan_slide, select_tiles
from derestainer.inference.slides import open_slide
from derestainer.inference.tissue import ink_mask, tissue_mask

BLUE, GREEN, BLACK = (40, 60, 160), (40, 140, 70), (30, 30, 35)
MPP = 4.0  # µm/px of the drawn thumbnails: min object/ink 312 px, max hole 1250 px
Draw = Callable[[ImageDraw.ImageDraw, int], None]


def _coverage(shape: tuple[int, int], draw: Draw, ss: int = 4) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of what ``draw(d, ss)`` paints on a ``ss``× canvas."""
    h, w = shape
    img = Image.new("L", (w * ss, h * ss), 0)
    draw(ImageDraw.Draw(img), ss)
    return np.asarray(img.resize((w, h), Image.Resampling.BOX), dtype=np.float64) / 255.0


def _line(points: list[tuple[float, float]], width: float) -> Draw:
    def draw(d: ImageDraw.ImageDraw, ss: int) -> None:
        pts = [(x * ss, y * ss) for x, y in points]
        d.line(pts, fill=255, width=round(width * ss), joint="curve")
        for x, y in pts:  # round caps
            r = width * ss / 2
            d.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return draw


def _ring(cx: float, cy: float, radius: float, width: float) -> Draw:
    def draw(d: ImageDraw.ImageDraw, ss: int) -> None:
        r = (radius + width / 2) * ss
        d.ellipse((cx * ss - r, cy * ss - r, cx * ss + r, cy * ss + r), outline=255, width=round(width * ss))
    return draw


def _ink(img: np.ndarray, alpha: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    out = img.astype(np.float64) * (1 - alpha[..., None]) + np.array(colour, np.float64) * alpha[..., None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _glass(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal((238, 238, 240), 2.5, (*shape, 3)), 0, 255).astype(np.uint8)


def _thumbnail(tissue: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A 200 × 300 glass thumbnail with an elliptical section of ``tissue`` (≥ 160 × 200 px) at the left."""
    img = _glass((200, 300))
    yy, xx = np.mgrid[:200, :300]
    blob = (yy - 100) ** 2 / 80**2 + (xx - 110) ** 2 / 100**2 < 1
    img[blob] = tissue[yy[blob] - 20, xx[blob] - 10]
    return img, blob


def _synthetic_tissue() -> np.ndarray:
    return np.concatenate([render_pair(3, 2, 256)[0], render_pair(4, 3, 256)[0]], axis=0)[:, :210]


def _real_tissue(real: Path) -> np.ndarray:
    img = Image.open(real / "he" / "tiatoolbox_target_image.png").convert("RGB")  # 1000 px H&E tile
    return np.asarray(img.resize((250, 250), Image.Resampling.BOX))  # thumbnail-like: 4 px → 1


def _draw_marks(img: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Blue, green and black strokes over glass and tissue, and a blue ring on the glass.

    Returns the inked image, per colour the pixels the ink must take out of the mask (over glass:
    coverage ≥ 0.2, translucent 60 %; over tissue: 95 % opaque, coverage ≥ 0.9), and the glass the ring
    encloses.
    """
    shape = img.shape[:2]
    strokes = {
        "blue": (BLUE, _coverage(shape, _line([(20, 30), (120, 60), (280, 40)], 8))),
        "green": (GREEN, _coverage(shape, _line([(40, 170), (150, 130), (285, 175)], 8))),
        "black": (BLACK, _coverage(shape, _line([(90, 10), (110, 110), (240, 190)], 7))),
    }
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    on_glass = xx >= 215  # right of the section
    out, must = img, {}
    for name, (colour, cov) in strokes.items():
        opacity = np.where(on_glass, 0.6, 0.95)
        out = _ink(out, cov * opacity, colour)
        must[name] = np.where(on_glass, cov >= 0.2, cov >= 0.9)
    ring = _coverage(shape, _ring(255, 100, 14, 6))
    out = _ink(out, ring * 0.9, BLUE)
    must["ring"] = ring >= 0.2
    inside = (yy - 100) ** 2 + (xx - 255) ** 2 < 10**2
    return out, must, inside


def _check_marks(img: np.ndarray, blob: np.ndarray) -> dict[str, int]:
    inked, must, inside = _draw_marks(img)
    clean = tissue_mask(img, MPP)
    assert (clean & blob).sum() / (clean | blob).sum() > 0.9  # the section is found without ink
    after, before = tissue_mask(inked, MPP), tissue_mask(inked, MPP, reject_ink=False)
    for name, px in must.items():
        assert not after[px].any(), f"{name} ink passed as tissue: {int(after[px].sum())} px"
    assert before[must["ring"]].mean() > 0.5 and before[inside].all()  # the old mask: ring and circled glass
    assert not after[inside].any()  # circled glass is not filled in
    strokes = np.logical_or.reduce([_coverage(img.shape[:2], _line(p, 12)) > 0 for p in (
        [(20, 30), (120, 60), (280, 40)], [(40, 170), (150, 130), (285, 175)], [(90, 10), (110, 110), (240, 190)])])
    out = ~strokes & ~_coverage(img.shape[:2], _ring(255, 100, 14, 12)).astype(bool)
    iou = (after & clean & out).sum() / ((after | clean) & out).sum()
    assert iou >= 0.95, iou
    return {"before": int(before[np.logical_or.reduce(list(must.values()))].sum()),
            "after": int(after[np.logical_or.reduce(list(must.values()))].sum())}


def test_ink_on_synthetic_thumbnail_is_not_tissue() -> None:
    img, blob = _thumbnail(_synthetic_tissue())
    counts = _check_marks(img, blob)
    assert counts["before"] > 1000 and counts["after"] == 0


def test_ink_on_real_thumbnail_is_not_tissue(real_data: Path) -> None:
    img, blob = _thumbnail(_real_tissue(real_data))
    counts = _check_marks(img, blob)
    assert counts["before"] > 1000 and counts["after"] == 0


def test_dense_nuclear_colours_are_tissue_not_ink() -> None:
    img = _glass((120, 200))
    dense = [(70, 60, 140), (62, 60, 132), (45, 35, 90), (90, 50, 110), (120, 80, 160)]  # R ≳ G, B highest
    for k, colour in enumerate(dense):
        img[20:100, 10 + 38 * k: 40 + 38 * k] = colour
    assert not ink_mask(img).any()
    mask = tissue_mask(img, MPP)
    for k in range(len(dense)):
        assert mask[25:95, 15 + 38 * k: 35 + 38 * k].all(), dense[k]
    # rendered H&E: the most hematoxylin-rich pixels stay tissue
    he, _, info = render_pair(5, 3, 128, return_maps=True)
    h = info["maps"]["he_concentration"][0]
    rich = h >= np.quantile(h, 0.95)
    assert not ink_mask(he).any()
    np.testing.assert_array_equal(tissue_mask(he), tissue_mask(he, reject_ink=False))
    assert tissue_mask(he)[rich].mean() > 0.99


@pytest.mark.parametrize("mpp", [None, 4.0])
def test_real_he_tiles_keep_their_tissue(real_data: Path, mpp: float | None) -> None:
    for path in sorted((real_data / "he").iterdir()):
        img = Image.open(path).convert("RGB")
        if mpp is not None:  # ~0.5 µm/px tiles seen at thumbnail resolution
            img = img.resize((img.width // 8, img.height // 8), Image.Resampling.BOX)
        rgb = np.asarray(img)
        new, old = tissue_mask(rgb, mpp), tissue_mask(rgb, mpp, reject_ink=False)
        assert abs(new.mean() - old.mean()) < 0.005, path.name
        if old.any():
            assert (new & old).sum() / (new | old).sum() > 0.99, path.name


def test_blank_glass_and_black_fill_stay_background() -> None:
    glass = _glass((64, 64), seed=1)
    assert not tissue_mask(glass, MPP).any() and not tissue_mask(glass, MPP, reject_ink=False).any()
    img = _glass((64, 64), seed=2)
    img[:, :20] = 0  # out-of-scan fill
    assert not tissue_mask(img, MPP).any()


def test_holes_in_tissue_still_fill_but_ink_dots_do_not() -> None:
    img = _glass((100, 100))
    img[10:90, 10:90] = (200, 120, 170)
    img[45:52, 45:52] = 238  # a 49 px lumen (< 1250 px at 4 µm/px)
    dot = _coverage((100, 100), _line([(30, 30), (30, 30)], 24)) >= 0.5  # 450 px ≥ 312 px of ink, < 1250 px of hole
    img = _ink(img, dot * 0.95, BLUE)
    mask = tissue_mask(img, MPP)
    assert mask[45:52, 45:52].all()
    assert not mask[dot].any()


def test_select_tiles_counts_ink_pixels(tmp_path: Path) -> None:
    img, _ = _thumbnail(_synthetic_tissue())
    inked, must, _ = _draw_marks(img)
    for name, pic, expect_ink in (("clean", img, False), ("inked", inked, True)):
        Image.fromarray(pic).save(tmp_path / f"{name}.png")
        with open_slide(tmp_path / f"{name}.png") as reader:
            plan = plan_slide(reader, MPP, tile=64, overlap=16, slide_mpp=MPP)
            sel = select_tiles(reader, plan, thumbnail_side=300)
            off = select_tiles(reader, plan, thumbnail_side=300, reject_ink=False)
        assert off.ink_pixels == 0
        assert (sel.ink_pixels > 1000) == expect_ink, sel.ink_pixels
        assert sel.ink_pixels == int((off.mask & ~sel.mask).sum())
    assert not sel.mask[must["ring"]].any()


def test_ink_on_real_slide_thumbnail(real_slide) -> None:
    path = real_slide("cmu_small_region.svs")
    with open_slide(path) as reader:
        thumb = reader.thumbnail(600)  # 449 × 600 px (w × h), ~2.5 µm/px
        mpp = float(reader.mpp or 0.499) * reader.dimensions[0] / thumb.shape[1]
    clean = tissue_mask(thumb, mpp)
    np.testing.assert_allclose(clean.mean(), tissue_mask(thumb, mpp, reject_ink=False).mean(), atol=0.005)
    shape = thumb.shape[:2]
    blue = _coverage(shape, _line([(20, 60), (200, 140), (420, 120)], 14))  # across glass and tissue
    green = _coverage(shape, _line([(30, 500), (250, 420), (440, 560)], 14))
    black = _coverage(shape, _line([(380, 30), (430, 300)], 12))
    ring = _coverage(shape, _ring(70, 330, 30, 10))  # on the glass left of the section
    inked = thumb
    for cov, colour in ((blue, BLUE), (green, GREEN), (black, BLACK), (ring, BLUE)):
        inked = _ink(inked, cov * np.where(clean, 0.95, 0.6), colour)  # 95 % over tissue, 60 % over glass
    glass_or_opaque = np.logical_or.reduce([c >= 0.9 for c in (blue, green, black, ring)]) | (
        np.logical_or.reduce([c >= 0.2 for c in (blue, green, black, ring)]) & ~clean)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inside = (yy - 330) ** 2 + (xx - 70) ** 2 < 25**2
    assert not clean[inside].any()
    before, after = tissue_mask(inked, mpp, reject_ink=False), tissue_mask(inked, mpp)
    assert before[glass_or_opaque].sum() > 2000 and before[inside].all()
    assert not after[glass_or_opaque].any() and not after[inside].any()
    marks = np.logical_or.reduce([c > 0 for c in (blue, green, black, ring)])
    out = ~ndi.binary_dilation(marks, iterations=4)
    assert (after & clean & out).sum() / ((after | clean) & out).sum() >= 0.95



def test_ink_mask_matches_the_rule_on_skimage_hsv(rng: np.random.Generator) -> None:
    from skimage.color import rgb2hsv

    rgb = rng.integers(0, 256, (120, 120, 3), dtype=np.uint8)
    rgb[40:80, 40:80] = BLUE  # a solid stroke survives the opening
    h, s, v = np.moveaxis(rgb2hsv(rgb), -1, 0)
    tie = np.isclose(s[..., None], [0.15, 0.30], atol=1e-6).any(-1) | np.isclose(v, 0.35, atol=1e-6)
    rgb[tie] = 240  # exact ties round either way (float32 vs float64): leave them out
    h, s, v = np.moveaxis(rgb2hsv(rgb), -1, 0)
    rule = ((h * 360 >= 70) & (h * 360 <= 235) & (s >= 0.15)) | ((v <= 0.35) & (s < 0.30))
    expect = ndi.binary_opening(rule, structure=np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool))
    np.testing.assert_array_equal(ink_mask(rgb, 1), expect)
    assert ink_mask(rgb, 1)[45:75, 45:75].all()

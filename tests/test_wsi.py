"""Whole-slide inference: readers, resolution, tissue-masked streaming, pyramidal OME-TIFF, resume, memory.

Test slides are written here with tifffile (tiled, pyramidal, with resolution tags); the real SVS
slides beside the repository are used through the ``real_data`` fixture when present.
"""

from __future__ import annotations

import functools
import json
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from derestainer.cli import main
from derestainer.core.config import load_config, replace
from derestainer.core.errors import SlideError
from derestainer.inference import ometiff, slide_outputs, slides, wsi
from derestainer.inference import plan as plan_mod
from derestainer.inference import stream as stream_mod
from derestainer.inference.loading import load_model
from derestainer.inference.ometiff import PyramidOptions, level_shapes, write_pyramid
from derestainer.inference.plan import plan_slide, read_model_region
from derestainer.inference.slide_jobs import list_slides, output_for, shard
from derestainer.inference.slide_options import SlideOptions
from derestainer.inference.slide_outputs import SlideOutputs, slide_level
from derestainer.inference.slides import open_slide
from derestainer.inference.tiling import TileGrid, grid_positions, rows_to_tiles
from derestainer.inference.wsi import translate_slide
from derestainer.models.base import GenOutput
from derestainer.models.files import save_generator
from derestainer.models.registry import register_generator

tifffile = pytest.importorskip("tifffile")

# --------------------------------------------------------------------------------------------------
# A tiny fully convolutional generator (receptive-field radius 3) and synthetic slides


class TinyFCN(nn.Module):
    """Reflect-padded 3×3 convs with eval BatchNorm and a pooled 4-class level head."""

    size_multiple = 4

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(8), nn.LeakyReLU(0.2),
            nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.LeakyReLU(0.2),
            nn.Conv2d(8, 3, 3, padding=1, padding_mode="reflect"), nn.Tanh(),
        )
        self.head = nn.Linear(3, 4)

    def forward(self, he: torch.Tensor, ihc: torch.Tensor | None = None) -> GenOutput:
        return GenOutput(ihc=self.body(he), level_logits=self.head(he.mean(dim=(2, 3)) * 4))


register_generator("_tw_fcn")(lambda mc: TinyFCN())


def make_model(path: Path, mpp: float) -> Path:
    cfg = replace(load_config("tiny"), model={"name": "_tw_fcn"}, data={"mpp": mpp, "size": 64})
    torch.manual_seed(0)
    model = TinyFCN()
    bn = model.body[1]
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 2.0)
    return save_generator(path, model.eval(), cfg)


def synth_rows(h: int, w: int, block: int = 256, seed: int = 0) -> Iterator[np.ndarray]:
    """A synthetic H&E-like slide, streamed in row blocks: glass with textured pink tissue ellipses."""
    xx = np.arange(w)[None, :]
    for y0 in range(0, h, block):
        y1 = min(h, y0 + block)
        yy = np.arange(y0, y1)[:, None]
        rng = np.random.default_rng(seed * 100_003 + y0)
        tissue = ((yy - 0.5 * h) ** 2 / (0.35 * h) ** 2 + (xx - 0.45 * w) ** 2 / (0.3 * w) ** 2) < 1
        tissue |= ((yy % 400) - 200) ** 2 + ((xx % 500) - 250) ** 2 < 90**2
        img = np.empty((y1 - y0, w, 3), np.float32)
        img[:] = (241, 240, 243)
        noise = rng.normal(0, 1, (y1 - y0, w, 1)).astype(np.float32)
        pink = np.array([205, 120, 175], np.float32) + 30 * noise * np.array([0.6, 1.0, 0.5], np.float32)
        img = np.where(tissue[..., None], pink, img + 2 * noise)
        yield np.clip(img, 0, 255).astype(np.uint8)


def synth_slide(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.concatenate(list(synth_rows(h, w, seed=seed)))


def write_slide(path: Path, h: int, w: int, mpp: float | None, levels: int = 3, tile: int = 128, seed: int = 0) -> Path:
    """Tiled pyramidal TIFF (reduced levels as top-level pages: OpenSlide's generic TIFF), streamed.

    Levels after the first are 2× subsamples of an in-memory copy, so only small slides get them.
    """
    res: dict = {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    opts = {"tile": (tile, tile), "photometric": "rgb", "compression": "zlib", "dtype": np.uint8}
    with tifffile.TiffWriter(path) as tif:
        tif.write(rows_to_tiles(synth_rows(h, w, seed=seed), w, tile), shape=(h, w, 3), **opts, **res)
        if levels > 1:
            img = synth_slide(h, w, seed)
            for k in range(1, levels):
                lv = np.ascontiguousarray(img[:: 2**k, :: 2**k])
                r = {} if mpp is None else {"resolution": (1e4 / (mpp * w / lv.shape[1]),) * 2,
                                            "resolutionunit": "CENTIMETER"}
                tif.write(lv, subfiletype=1, **{k2: v for k2, v in opts.items() if k2 != "dtype"}, **r)
    return path


def whole_image_output(model_file: Path, img: np.ndarray) -> np.ndarray:
    """The model applied to the whole image at once, as uint8 (the stitched output's reference)."""
    lm = load_model(model_file, "cpu", precision="fp32")
    with torch.no_grad():
        x = torch.from_numpy(img.transpose(2, 0, 1).copy())[None].float() / 127.5 - 1
        y = lm.model(x).ihc[0].permute(1, 2, 0).numpy()
    return np.clip(((y + 1) / 2) * 255 + 0.5, 0, 255).astype(np.uint8)


def read_base(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tf:
        return tf.series[0].levels[0].asarray()


FAST = {"progress": False, "batch_size": 8, "workers": 1}
FP32 = {"precision": "fp32"}  # results that must not depend on whether this CPU has bf16


# --------------------------------------------------------------------------------------------------
# Readers and resolution


def test_open_slide_reads_levels_and_mpp(tmp_path: Path) -> None:
    p = write_slide(tmp_path / "s.tif", 300, 420, mpp=0.5, levels=3, tile=64)
    img = synth_slide(300, 420)
    with open_slide(p) as r:
        assert r.dimensions == (420, 300)
        assert [tuple(d) for d in r.level_dimensions] == [(420, 300), (210, 150), (105, 75)]
        assert r.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(r.read_level(0, 10, 20, 50, 40), img[20:60, 10:60])
        out = r.read_level(0, 400, 290, 40, 30)  # hangs over the edge: white outside
        np.testing.assert_array_equal(out[:10, :20], img[290:, 400:])
        assert (out[10:] == 255).all() and (out[:, 20:] == 255).all()
        th = r.thumbnail(100)
        assert max(th.shape[:2]) == 100 and th.shape[2] == 3


def test_tifffile_and_pillow_readers(tmp_path: Path) -> None:
    img = synth_slide(120, 160)
    striped = tmp_path / "striped.tif"  # not tiled: OpenSlide refuses it, tifffile reads it
    tifffile.imwrite(striped, img, photometric="rgb", resolution=(1e4 / 0.8, 1e4 / 0.8), resolutionunit="CENTIMETER")
    with open_slide(striped) as r:
        assert isinstance(r, slides.TiffReader) and r.mpp == pytest.approx(0.8)
        np.testing.assert_array_equal(r.read_level(0, 5, 7, 30, 20), img[7:27, 5:35])
    png = tmp_path / "slide.png"
    Image.fromarray(img).save(png)
    with open_slide(png) as r:
        assert isinstance(r, slides.ImageReader) and r.mpp is None
        np.testing.assert_array_equal(r.read_level(0, 0, 0, 160, 120), img)
    with pytest.raises(SlideError, match="no such slide"):
        open_slide(tmp_path / "missing.svs")


def test_plan_picks_level_and_needs_mpp(tmp_path: Path) -> None:
    p = write_slide(tmp_path / "s.tif", 300, 420, mpp=0.5, levels=3, tile=64)
    with open_slide(p) as r:
        plan = plan_slide(r, 1.0, tile=64, overlap=16)
        assert (plan.level, plan.resample, plan.width, plan.height) == (1, 1.0, 210, 150)
        plan = plan_slide(r, 1.5, tile=64, overlap=16)
        assert plan.level == 1 and plan.resample == pytest.approx(1.5) and plan.width == 140
        plan = plan_slide(r, 4.0, tile=64, overlap=16, slide_mpp=1.0)  # --mpp overrides the file
        assert plan.mpp_source == "--mpp" and plan.level == 2 and plan.resample == pytest.approx(1.0)
    nompp = write_slide(tmp_path / "nompp.tif", 100, 100, mpp=None, levels=1, tile=64)
    with open_slide(nompp) as r, pytest.raises(SlideError, match="--slide-mpp"):
        plan_slide(r, 1.0, tile=64, overlap=16)


@pytest.mark.parametrize("model_mpp", [1.0, 0.75, 0.6])
def test_resampling_reproduces_a_linear_ramp(tmp_path: Path, model_mpp: float) -> None:
    """Lanczos resampling of a linear ramp gives the ramp at each output pixel's centre (± rounding)."""
    yy, xx = np.mgrid[0:240, 0:240]
    img = np.stack([xx, yy, np.full_like(xx, 128)], axis=-1).astype(np.uint8)
    p = tmp_path / "ramp.tif"
    tifffile.imwrite(p, img, tile=(64, 64), photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5),
                     resolutionunit="CENTIMETER")
    with open_slide(p) as r:
        plan = plan_slide(r, model_mpp, tile=64, overlap=16)
        f = model_mpp / 0.5
        assert plan.level == 0 and plan.resample == pytest.approx(f)
        y0, x0 = 20, 30  # source window plus the filter's support stays inside the slide (no white edge)
        region = read_model_region(r, plan, y0, x0, 64, 64).astype(float)
    # Output pixel j covers source [(x0 + j)·f, (x0 + j + 1)·f): its centre is at (x0 + j + ½)·f − ½ in pixel indices.
    ex = (x0 + np.arange(64) + 0.5) * f - 0.5
    ey = (y0 + np.arange(64) + 0.5) * f - 0.5
    assert np.abs(region[..., 0] - ex[None, :]).max() <= 1
    assert np.abs(region[..., 1] - ey[:, None]).max() <= 1
    assert (region[..., 2] == 128).all()


def test_planar_tiffs_are_read_colour_last(tmp_path: Path) -> None:
    """Planar RGB (axes SYX) and OME CYX TIFFs give the same pixels as the interleaved image."""
    img = synth_slide(120, 160)
    planar = np.ascontiguousarray(img.transpose(2, 0, 1))
    res = {"resolution": (1e4 / 0.5, 1e4 / 0.5), "resolutionunit": "CENTIMETER"}
    paths = {
        "separate": tmp_path / "planar.tif",
        "ome": tmp_path / "planar.ome.tif",
    }
    tifffile.imwrite(paths["separate"], planar, photometric="rgb", planarconfig="separate", tile=(64, 64), **res)
    tifffile.imwrite(paths["ome"], planar, photometric="rgb", metadata={"axes": "CYX", "PhysicalSizeX": 0.5,
                                                                        "PhysicalSizeY": 0.5})
    for name, p in paths.items():
        with slides.TiffReader(p) as r:  # directly: OpenSlide would take the tiled one
            assert r.dimensions == (160, 120) and r.mpp == pytest.approx(0.5), name
            np.testing.assert_array_equal(r.read_level(0, 5, 7, 30, 20), img[7:27, 5:35], err_msg=name)
            out = r.read_level(0, 150, 110, 20, 20)  # over the edge: white outside
            np.testing.assert_array_equal(out[:10, :10], img[110:, 150:], err_msg=name)
            assert (out[10:] == 255).all() and (out[:, 10:] == 255).all()
            assert r.thumbnail(40).shape[2] == 3
    stack = tmp_path / "stack.tif"  # five grey planes: not one image
    tifffile.imwrite(stack, np.zeros((5, 32, 32), np.uint8), photometric="minisblack")
    with pytest.raises(SlideError, match=r"stack\.tif: unsupported TIFF layout \(axes \w*YX"):
        slides.TiffReader(stack)


def test_heatmap_leaves_the_matplotlib_backend_alone(tmp_path: Path) -> None:
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("pdf")  # stands for the user's own backend (e.g. Jupyter's inline one)
    try:
        grid = TileGrid(100, 120, 64, 16, -1)
        plan = plan_mod.SlidePlan(0.5, "test", 0.5, 1.0, 0, 1.0, 100, 120, grid)
        probs = [[[0.1, 0.2, 0.3, 0.4]] * grid.n_cols for _ in range(grid.n_rows)]
        thumb = synth_slide(50, 60)
        slide_outputs.write_heatmap(tmp_path / "h.png", thumb, np.ones((50, 60), bool), plan, probs, ("0", "1+", "2+", "3+"))
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)
    with Image.open(tmp_path / "h.png") as im:
        assert im.format == "PNG" and im.size[0] > 0


def test_slide_level_rule() -> None:
    assert slide_level([1.0, 0, 0, 0]) == 0
    assert slide_level([0.5, 0.3, 0.15, 0.05]) == 2  # ≥2+: 20 % > 10 %; 3+: 5 %
    assert slide_level([0.85, 0.0, 0.0, 0.15]) == 3
    assert slide_level([0.95, 0.05, 0.0, 0.0]) == 0
    assert slide_level([0.5, 0.3, 0.15, 0.05], threshold=0.25) == 1


def test_output_naming_and_sharding(tmp_path: Path) -> None:
    slides = [Path("a/x.svs"), Path("b/y.ome.tiff"), Path("c/z.ndpi")]
    assert output_for(slides, tmp_path) == [tmp_path / "x.ome.tiff", tmp_path / "y.ome.tiff", tmp_path / "z.ome.tiff"]
    assert output_for(slides[:1], tmp_path / "o.ome.tiff") == [tmp_path / "o.ome.tiff"]
    with pytest.raises(SlideError, match="single output file"):
        output_for(slides, tmp_path / "o.ome.tiff")
    with pytest.raises(SlideError, match="both be written"):
        output_for([Path("a/x.svs"), Path("b/x.tif")], tmp_path)
    assert shard(list(range(7)), 1, 3) == [1, 4]
    assert sorted(x for r in range(3) for x in shard(list(range(7)), r, 3)) == list(range(7))
    outs = SlideOutputs.for_tiff(tmp_path / "o.ome.tiff")
    assert outs.heatmap.name == "o.heatmap.png" and outs.summary.name == "o.summary.json"


def test_list_slides_finds_every_suffix_open_slide_reads_as_tiff(tmp_path: Path) -> None:
    names = ["a.btf", "b.tf8", "c.tf2", "d.TIF", "e.svs", "notes.txt"]
    for n in names:
        (tmp_path / n).write_bytes(b"")
    assert [p.name for p in list_slides([tmp_path])] == names[:-1]


@pytest.mark.parametrize("layout", ["ome", "openslide"])
@pytest.mark.parametrize("h,w", [(128, 320), (130, 97)])  # exact multiples of the tile, and not
def test_write_pyramid_levels_are_2x_means(tmp_path: Path, rng: np.random.Generator, layout: str, h: int, w: int) -> None:
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = tmp_path / "p.tif"
    info = write_pyramid(out, iter([img[:50], img[50:51], img[51:]]), h, w, 0.25, work_dir=tmp_path / "wk",
                         options=PyramidOptions(tile=64, compression="lossless", layout=layout))
    shapes = level_shapes(h, w, 64)
    assert [tuple(s) for s in info["levels"]] == shapes and max(shapes[-1]) <= 64 < max(shapes[-2])
    with tifffile.TiffFile(out) as tf:
        levels = [lv.asarray() for lv in tf.series[0].levels]
        assert tf.is_ome == (layout == "ome")
        xres = tf.pages[0].tags["XResolution"].value
        assert xres[0] / xres[1] == pytest.approx(1e4 / 0.25)  # pixels per cm
    assert [lv.shape[:2] for lv in levels] == shapes
    np.testing.assert_array_equal(levels[0], img)
    ref = img.astype(np.float64)
    for lv in levels[1:]:  # each level: 2×2 means (edges replicated) of the one above, rounded
        hh, ww = ref.shape[:2]
        ref = np.pad(ref, ((0, hh % 2), (0, ww % 2), (0, 0)), mode="edge")
        ref = np.floor(ref.reshape(ref.shape[0] // 2, 2, ref.shape[1] // 2, 2, 3).mean(axis=(1, 3)) + 0.5)
        np.testing.assert_array_equal(lv, ref.astype(np.uint8))
    assert not list((tmp_path / "wk").glob("*.npz"))  # spools cleaned up


def test_write_pyramid_failure_leaves_nothing(tmp_path: Path) -> None:
    def rows():
        yield np.zeros((40, 100, 3), np.uint8)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_pyramid(tmp_path / "p.ome.tiff", rows(), 100, 100, 1.0, work_dir=tmp_path / "wk",
                      options=PyramidOptions(tile=64))
    with pytest.raises(ValueError, match="got 40 rows"):
        write_pyramid(tmp_path / "p.ome.tiff", iter([np.zeros((40, 100, 3), np.uint8)]), 100, 100, 1.0,
                      work_dir=tmp_path / "wk", options=PyramidOptions(tile=64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wk"]


# --------------------------------------------------------------------------------------------------
# End to end


def test_translate_slide_equals_whole_image_and_is_readable(tmp_path: Path) -> None:
    openslide = pytest.importorskip("openslide")
    tiffslide = pytest.importorskip("tiffslide")
    h, w = 300, 420
    slide = write_slide(tmp_path / "s.tif", h, w, mpp=0.5, levels=1, tile=64)
    mf = make_model(tmp_path / "m.safetensors", mpp=0.5)
    out = tmp_path / "out" / "s.ome.tiff"
    s = translate_slide(load_model(mf, "cpu", precision="fp32"), slide, out,
                        SlideOptions(tile=64, overlap=16, compression="lossless", all_tiles=True, out_tile=64, **FAST,
                                     **FP32))
    base = read_base(out)
    ref = whole_image_output(mf, synth_slide(h, w))
    n_tiles = len(grid_positions(h, 64, 16)) * len(grid_positions(w, 64, 16))
    assert base.shape == (h, w, 3)
    assert np.abs(base.astype(int) - ref).max() <= 1  # stitched = whole image (rounding only)
    assert s["output_size"] == [w, h] and s["tiles"]["run"] == s["tiles"]["total"] == n_tiles
    assert not s["resumed"] and s["tiles_per_second"] > 0

    sl = openslide.OpenSlide(str(out))
    assert sl.dimensions == (w, h) and float(sl.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    region = np.asarray(sl.read_region((100, 50), 0, (80, 60)).convert("RGB"))
    np.testing.assert_array_equal(region, base[50:110, 100:180])
    ts = tiffslide.TiffSlide(str(out))
    assert ts.level_dimensions == ((420, 300), (210, 150), (105, 75), (53, 38))  # tile 64: halve until ≤ 64
    assert float(ts.properties["tiffslide.mpp-x"]) == pytest.approx(0.5)
    assert ts.level_downsamples[1] == pytest.approx(2.0)
    with tifffile.TiffFile(out) as tf:
        assert tf.is_ome and 'PhysicalSizeX="0.5"' in tf.ome_metadata
        lv1 = tf.series[0].levels[1].asarray()
    expect1 = base[:300:2, :420:2].astype(float)  # 2×2 means ≈ subsample on smooth outputs: loose check
    assert np.abs(lv1.astype(float) - expect1).mean() < 20
    with open_slide(out) as r:  # our own output as input: tifffile reader, SubIFD levels, OME mpp
        assert isinstance(r, slides.TiffReader) and r.mpp == pytest.approx(0.5) and "OME" in r.mpp_source
        assert r.level_dimensions[:2] == [(420, 300), (210, 150)]
        np.testing.assert_array_equal(r.read_level(1, 30, 40, 50, 20), lv1[40:60, 30:80])

    # Side outputs.
    summ = json.loads((tmp_path / "out" / "s.summary.json").read_text())
    assert summ["predicted_level"] in ("0", "1+", "2+", "3+") and summ["model_mpp"] == 0.5
    assert sum(summ["mean_probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert (tmp_path / "out" / "s.heatmap.png").is_file()
    lines = (tmp_path / "out" / "s.tiles.csv").read_text().splitlines()
    assert len(lines) == 1 + n_tiles
    assert not (tmp_path / "out" / ".s.work").exists()  # work folder removed after success


def test_background_tiles_are_white_and_jpeg_layout_openslide(tmp_path: Path) -> None:
    openslide = pytest.importorskip("openslide")
    h, w = 256, 640
    img = synth_slide(h, w)
    img[:, 420:] = (241, 240, 243)  # right part: glass only
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5),
                     resolutionunit="CENTIMETER")
    mf = make_model(tmp_path / "m.safetensors", mpp=1.0)
    out = tmp_path / "s.ome.tiff"
    s = translate_slide(load_model(mf, "cpu"), path, out,
                        SlideOptions(tile=64, overlap=16, layout="openslide", compression="jpeg", out_tile=64,
                                     geometry="model", **FAST))
    assert 0 < s["tiles"]["run"] < s["tiles"]["total"]
    sl = openslide.OpenSlide(str(out))
    assert sl.dimensions == (320, 128) and sl.level_count == len(level_shapes(128, 320, 64)) == 4  # all levels
    assert float(sl.properties["openslide.mpp-x"]) == pytest.approx(1.0)
    full = np.asarray(sl.read_region((0, 0), 0, sl.dimensions).convert("RGB")).astype(int)
    assert (full[:, 260:] >= 250).all()  # glass → white (JPEG tolerance)
    assert full[:, :180].std() > 5  # tissue → model output
    assert 0.05 < s["tissue_fraction"] < 0.8


def test_interrupted_run_leaves_no_output_and_resume_completes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h, w = 330, 200
    slide = write_slide(tmp_path / "s.tif", h, w, mpp=0.5, levels=1, tile=64)
    mf = make_model(tmp_path / "m.safetensors", mpp=0.5)
    lm = load_model(mf, "cpu", precision="fp32")
    opts = SlideOptions(tile=64, overlap=16, compression="lossless", all_tiles=True, batch_size=4, **FP32, **{
        k: v for k, v in FAST.items() if k != "batch_size"})
    ref_out = tmp_path / "ref" / "s.ome.tiff"
    translate_slide(lm, slide, ref_out, opts)

    real = stream_mod.infer_tiles
    calls = {"n": 0}

    def crashing(*a, **k):  # simulated crash mid-way (e.g. out of memory, node pre-empted)
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    # 7 tile rows × 4 columns, one batch per row: the 4th batch crashes.
    monkeypatch.setattr(stream_mod, "infer_tiles", crashing)
    out = tmp_path / "out" / "s.ome.tiff"
    with pytest.raises(RuntimeError, match="simulated crash"):
        translate_slide(lm, slide, out, opts)
    assert not out.exists()
    # no temporary TIFF left behind, and no marker: no output was replaced before the interruption
    assert [p.name for p in out.parent.iterdir()] == [".s.work"]
    work = out.parent / ".s.work"
    progress = json.loads((work / "progress.json").read_text())
    assert set(progress) == {"format", "settings"}  # written once; finished bands have side files
    assert sorted(p.name for p in work.glob("band_*.json")) == [f"band_{i:05d}.json" for i in range(3)]
    assert json.loads((work / "band_00001.json").read_text())["probs"][0] is not None

    calls["n"] = -1000  # no more crashes; count the batches the resumed run computes
    resumed = translate_slide(lm, slide, out, SlideOptions(**{**opts.__dict__, "resume": True}))
    assert resumed["resumed"] and resumed["tiles"]["computed_this_session"] < 7 * 4
    assert 0 < calls["n"] + 1000 < 7  # only the unfinished rows (and the one before, for its overlap)
    np.testing.assert_array_equal(read_base(out), read_base(ref_out))
    assert not (out.parent / ".s.work").exists()
    assert not (out.parent / ".s.summary.json.unfinished").exists()

    # Resuming with other settings is refused with a clear message.
    monkeypatch.setattr(stream_mod, "infer_tiles", crashing)
    calls["n"] = 0
    out2 = tmp_path / "o2" / "s.ome.tiff"
    with pytest.raises(RuntimeError):
        translate_slide(lm, slide, out2, opts)
    with pytest.raises(SlideError, match="other settings.*overlap"):
        translate_slide(lm, slide, out2, SlideOptions(**{**opts.__dict__, "resume": True, "overlap": 24}))
    # ... and so is resuming with other numerics: another precision, or the plain model instead of the fast path.
    bf16 = load_model(mf, "cpu", precision="bf16")
    with pytest.raises(SlideError, match="other settings.*precision"):
        translate_slide(bf16, slide, out2, SlideOptions(**{**opts.__dict__, "resume": True, "precision": "bf16"}))
    plain = load_model(mf, "cpu", fast=False)
    with pytest.raises(SlideError, match=r"other settings \(fast\)"):
        translate_slide(plain, slide, out2, SlideOptions(**{**opts.__dict__, "resume": True}))
    # An explicit precision the fast model was not built with is refused before anything runs.
    with pytest.raises(SlideError, match="built to run in 'fp32'"):
        translate_slide(lm, slide, out2, SlideOptions(**{**opts.__dict__, "resume": True, "precision": "bf16"}))


def test_translate_slide_cli_many_slides_sharded(tmp_path: Path) -> None:
    d = tmp_path / "slides"
    d.mkdir()
    for k in range(3):
        write_slide(d / f"s{k}.tif", 128, 160, mpp=1.0, levels=1, tile=64, seed=k)
    mf = make_model(tmp_path / "m.safetensors", mpp=2.0)
    out = tmp_path / "out"
    res = CliRunner(env={"RANK": "1", "WORLD_SIZE": "2"}).invoke(
        main, ["translate-slide", "-m", str(mf), str(d), "--out", str(out), "--tile", "32", "--overlap", "8",
               "--quiet", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.glob("*.ome.tiff") if ".her2." not in p.name) == ["s1.ome.tiff"]  # rank 1 of 2
    assert "s1.tif" in res.output and "tiles" in res.output
    res = CliRunner().invoke(main, ["translate-slide", "-m", str(mf), str(d / "nothing.svs"), "--out", str(out)])
    assert res.exit_code == 1 and "no such slide" in res.output and "Traceback" not in res.output


def test_png_slide_needs_mpp(tmp_path: Path) -> None:
    png = tmp_path / "big.png"
    Image.fromarray(synth_slide(96, 128)).save(png)
    mf = make_model(tmp_path / "m.safetensors", mpp=1.0)
    res = CliRunner().invoke(main, ["translate-slide", "-m", str(mf), str(png), "--out", str(tmp_path / "o"),
                                    "--tile", "32", "--overlap", "8", "--quiet"])
    assert res.exit_code == 1 and "--slide-mpp" in res.output
    res = CliRunner().invoke(main, ["translate-slide", "-m", str(mf), str(png), "--out", str(tmp_path / "o"),
                                    "--tile", "32", "--overlap", "8", "--quiet", "--mpp", "0.5"])
    assert res.exit_code == 0, res.output
    assert read_base(tmp_path / "o" / "big.ome.tiff").shape == (96, 128, 3)  # native geometry: the PNG's size


# --------------------------------------------------------------------------------------------------
# Memory does not grow with slide size


def test_memory_in_flight_is_flat_in_slide_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the stream holds at once — tiles given to the readers, tile arrays alive, rows waiting in the
    TIFF writer, tifffile's encoder batch — is the same on a slide and on one 4× taller, and within the
    stated bounds. Counted (objects and rows), not measured in bytes: it does not depend on machine load.
    """
    mf = make_model(tmp_path / "m.safetensors", mpp=0.5)
    lm = load_model(mf, "cpu")
    opts = SlideOptions(tile=256, overlap=32, **FAST)
    w, heights = 384, {"small": 768, "large": 3072}  # 4× the pixels (taller: memory is per row band)
    slides = {n: write_slide(tmp_path / f"{n}.tif", h, w, mpp=0.5, levels=1, tile=256) for n, h in heights.items()}
    seen: dict[str, list] = {"streams": [], "stats": [], "buffersize": []}
    live = {"now": 0, "max": 0}
    lock = threading.Lock()
    hoard: list[np.ndarray] = []

    class RecordingStream(stream_mod.BandStream):
        def __init__(self, *a, **k) -> None:
            super().__init__(*a, **k)
            seen["streams"].append(self)

    def recording_write(*a, **k):
        seen["stats"].append(ometiff.PyramidStats())
        return real_write(*a, **k, stats=seen["stats"][-1])

    def count(n: int) -> None:
        with lock:
            live["now"] += n
            live["max"] = max(live["max"], live["now"])

    def counted_read(*a, **k):  # runs in the reader threads; the tiles are freed by the consumer
        tile = real_read(*a, **k)
        count(1)
        weakref.finalize(tile, count, -1)
        return tile

    @functools.wraps(tifffile.TiffWriter.write)
    def spy_write(self, *a, **k):
        seen["buffersize"].append(k.get("buffersize"))
        return real_tiff_write(self, *a, **k)

    real_write, real_read, real_tiff_write = wsi.write_pyramid, stream_mod.read_model_region, tifffile.TiffWriter.write
    monkeypatch.setattr(wsi, "BandStream", RecordingStream)
    monkeypatch.setattr(wsi, "write_pyramid", recording_write)
    monkeypatch.setattr(stream_mod, "read_model_region", counted_read)
    monkeypatch.setattr(tifffile.TiffWriter, "write", spy_write)

    def measure(name: str) -> dict:
        live["max"] = 0
        seen["buffersize"].clear()
        translate_slide(lm, slides[name], tmp_path / name / "o.ome.tiff", opts)
        st, stats = seen["streams"][-1], seen["stats"][-1]
        return {"tiles": st.tiles_in_flight.max, "bound": st.tile_bound, "live": live["max"],
                "tiler": [h.max for h in stats.tiler], "spool": [h.max for h in stats.spool],
                "buffersize": list(seen["buffersize"]), "levels": len(stats.tiler)}

    small, large = measure("small"), measure("large")
    print(f"in flight: small {small}, large {large}")
    assert small["tiles"] == large["tiles"] <= small["bound"] == large["bound"] == 4  # 2 tile rows of 2 columns
    assert small["live"] <= small["bound"] and large["live"] <= large["bound"]  # arrays alive, any timing
    # The writer: the base level's tiler holds < TIFF tile + one band (≤ one slide tile) rows, a spool
    # < 256 rows per file + one reduced band; tifffile encodes one row of TIFF tiles at a time.
    assert small["tiler"][0] == large["tiler"][0] < 256 + 256
    # (spools fill to different heights before a flush on a slide too small for a steady state)
    assert max(small["spool"] + large["spool"]) < 256 + 128
    assert max(small["tiler"] + large["tiler"]) < 256 + 256 + 128
    assert large["buffersize"][0] == small["buffersize"][0] == ometiff.encoder_buffer(256, w) == 2 * 256 * 256 * 3
    assert large["levels"] > small["levels"]  # the larger slide has another pyramid level, held the same way
    assert read_base(tmp_path / "large" / "o.ome.tiff").shape == (3072, w, 3)

    # Control: tiles kept beyond their row are seen by the count of arrays alive.
    monkeypatch.setattr(stream_mod, "read_model_region", lambda *a, **k: (hoard.append(t := counted_read(*a, **k)), t)[1])
    leaky = measure("small")
    assert leaky["live"] == len(hoard) > leaky["bound"]


# --------------------------------------------------------------------------------------------------
# Real slides (skipped where ../shared/data/real is absent)


def test_real_svs_slide(real_slide, tmp_path: Path) -> None:
    svs = real_slide("cmu_small_region.svs")
    mf = make_model(tmp_path / "m.safetensors", mpp=8.0)  # coarse model: ~140×185 px output, a dozen tiles
    out = tmp_path / "cmu.ome.tiff"
    s = translate_slide(load_model(mf, "cpu"), svs, out,
                        SlideOptions(tile=64, overlap=16, out_tile=64, geometry="model", **FAST))
    assert s["mpp_source"] == "openslide.mpp-x" and s["slide_mpp"] == pytest.approx(0.499)
    assert s["output_size"] == [round(2220 * 0.499 / 8), round(2967 * 0.499 / 8)]
    assert 0.2 < s["tissue_fraction"] < 0.6 and 0 < s["tiles"]["run"] <= s["tiles"]["total"]
    import openslide

    sl = openslide.OpenSlide(str(out))
    assert sl.dimensions == tuple(s["output_size"]) and float(sl.properties["openslide.mpp-x"]) == pytest.approx(8.0)


def test_real_svs_without_mpp_and_level_choice(real_slide) -> None:
    svs = real_slide("tcga-cr-7395-01a-01-ts1.svs")
    with open_slide(svs) as r:
        assert r.mpp is None and len(r.level_dimensions) == 2
        with pytest.raises(SlideError, match="--slide-mpp"):
            plan_slide(r, 2.0, tile=64, overlap=16)
        plan = plan_slide(r, 2.0, tile=64, overlap=16, slide_mpp=0.25)  # 8 level-0 px per model px
        assert plan.level == 1 and plan.resample == pytest.approx(8 / 2.0005, rel=1e-3)
        region = read_model_region(r, plan, plan.height // 2 - 32, plan.width // 2 - 32, 64, 64)
        assert region.shape == (64, 64, 3) and region.mean() < 230  # tissue in the centre


def test_a_failed_rerun_keeps_the_old_outputs_until_the_new_tiff_replaces_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rerunning over a finished slide: a failure while tiles are computed leaves the old TIFF, side files
    and summary as they were (no marker); a failure after the new TIFF replaced the old one removes the
    old summary and leaves the marker, so the mix is never taken for a finished run."""
    from derestainer.core.guard import unfinished_marker

    slide = write_slide(tmp_path / "s.tif", 200, 160, mpp=0.5, levels=1, tile=64)
    lm = load_model(make_model(tmp_path / "m.safetensors", mpp=0.5), "cpu", precision="fp32")
    opts = SlideOptions(tile=64, overlap=16, compression="lossless", all_tiles=True, batch_size=4, **FP32, **{
        k: v for k, v in FAST.items() if k != "batch_size"})
    out = tmp_path / "out" / "s.ome.tiff"
    translate_slide(lm, slide, out, opts)
    summary = out.parent / "s.summary.json"
    first = {p.name: p.read_bytes() for p in out.parent.iterdir() if p.is_file()}

    def crash(*a: object, **k: object) -> None:
        raise RuntimeError("simulated crash")

    with monkeypatch.context() as mp:
        mp.setattr(stream_mod, "infer_tiles", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            translate_slide(lm, slide, out, opts)
    assert {p.name: p.read_bytes() for p in out.parent.iterdir() if p.is_file()} == first
    assert not unfinished_marker(summary).exists()

    with monkeypatch.context() as mp:
        mp.setattr(slide_outputs, "write_tiles_csv", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            translate_slide(lm, slide, out, opts)
    assert out.exists() and not summary.exists() and unfinished_marker(summary).exists()
    translate_slide(lm, slide, out, opts)
    assert summary.exists() and not unfinished_marker(summary).exists()

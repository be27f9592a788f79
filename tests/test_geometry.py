"""Output geometry of whole-slide translation: native (the slide's level 0) and model (the model's µm/px)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from derestainer.inference.geometry import output_geometry, resample_rows
from derestainer.inference.loading import load_model
from derestainer.inference.slide_options import SlideOptions
from derestainer.inference.tiling import HighWater
from derestainer.inference.wsi import translate_slide
from test_wsi import FAST, make_model, read_base, write_slide

tifffile = pytest.importorskip("tifffile")

CASES = [  # (source width, height), (output width, height), incoming block rows, output chunk rows
    ((50, 37), (200, 149), 7, 16),     # 4× up, blocks smaller than the filter's reach
    ((50, 37), (201, 147), 11, 64),    # unequal ratios per axis
    ((120, 90), (61, 45), 13, 8),      # down
    ((33, 70), (99, 210), 70, 256),    # one block, one chunk
    ((64, 64), (64, 64), 5, 3),        # same size: the blocks unchanged
]


@pytest.mark.parametrize(("src", "dst", "block", "chunk"), CASES)
def test_streamed_resampling_equals_resizing_the_whole_image(src, dst, block, chunk) -> None:
    rng = np.random.default_rng(0)
    img = (rng.random((src[1], src[0], 3)) * 255).astype(np.uint8)
    whole = np.asarray(Image.fromarray(img).resize(dst, Image.Resampling.BICUBIC)).astype(int)
    held = HighWater()
    blocks = [img[i:i + block] for i in range(0, src[1], block)]
    given: list[int] = []

    def source():  # records how far the resampler pulled
        for k, b in enumerate(blocks):
            given.append(k)
            yield b

    parts = list(resample_rows(source(), src, dst, chunk=chunk, held=held))
    got = np.concatenate(parts).astype(int)
    assert got.shape == whole.shape and all(p.shape[0] <= max(chunk, block) for p in parts)
    assert np.abs(got - whole).max() <= 1  # rounding of Pillow's fixed-point coefficients
    # bounded memory: the source rows one chunk reaches (with the bicubic support) plus one incoming block
    reach = int(np.ceil(chunk * src[1] / dst[1])) + 2 * (int(np.ceil(2 * max(src[1] / dst[1], 1))) + 1)
    assert held.max <= reach + block + 1
    assert given == list(range(len(blocks)))  # the whole source is consumed (its last block included)


def test_short_stream_is_an_error() -> None:
    img = np.zeros((10, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="end at row 10 of 20"):
        list(resample_rows(iter([img]), (8, 20), (16, 40)))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One slide at 0.5 µm/px translated by a model at 1.0 µm/px in both geometries."""
    d = tmp_path_factory.mktemp("geometry")
    slide = write_slide(d / "s.tif", 150, 210, mpp=0.5, levels=1, tile=64)
    lm = load_model(make_model(d / "m.safetensors", mpp=1.0), "cpu")
    opts = {"tile": 32, "overlap": 8, "compression": "lossless", "out_tile": 32, **FAST}
    out = {}
    for g in ("native", "model"):
        o = d / g / "s.ome.tiff"
        out[g] = (o, translate_slide(lm, slide, o, SlideOptions(**opts, geometry=g)))  # type: ignore[arg-type]
    return out


def test_native_geometry_is_the_slides_level0(pair: dict) -> None:
    (native, s), (model, sm) = pair["native"], pair["model"]
    assert s["geometry"] == "native" and s["output_size"] == [210, 150] and s["output_mpp"] == 0.5
    assert sm["geometry"] == "model" and sm["output_size"] == [105, 75] == sm["model_size"] and sm["output_mpp"] == 1.0
    with tifffile.TiffFile(native) as tf:
        assert tf.series[0].shape[:2] == (150, 210)
        x, unit = tf.pages[0].tags["XResolution"].value, tf.pages[0].tags["ResolutionUnit"].value
        assert unit == 3 and 1e4 * x[1] / x[0] == pytest.approx(0.5)  # centimetre: µm per pixel
    # the virtual IHC is the model-resolution one brought to the slide's pixels, nothing else
    low, high = read_base(model), read_base(native)
    expect = np.asarray(Image.fromarray(low).resize((210, 150), Image.Resampling.BICUBIC)).astype(int)
    assert np.abs(high.astype(int) - expect).max() <= 1
    # same tiles, same HER2 calls: only the written image differs
    assert s["tiles"] == sm["tiles"] and s["mean_probabilities"] == sm["mean_probabilities"]
    assert s["ink_pixels"] == sm["ink_pixels"] == 0  # recorded; no pen on this slide
    assert s["provenance"]["output_mpp"] == 0.5 and sm["provenance"]["output_mpp"] == 1.0


def test_unknown_geometry_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown geometry 'level0'"):
        output_geometry(None, (1, 1), "level0")  # type: ignore[arg-type]


def test_cli_geometry_option(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from derestainer.cli import main

    slide = write_slide(tmp_path / "s.tif", 64, 96, mpp=0.5, levels=1, tile=64)
    mf = make_model(tmp_path / "m.safetensors", mpp=1.0)
    for g, shape in (("native", (64, 96, 3)), ("model", (32, 48, 3))):
        res = CliRunner().invoke(main, ["translate-slide", "-m", str(mf), str(slide), "--out", str(tmp_path / g),
                                        "--tile", "32", "--overlap", "8", "--quiet", "--device", "cpu",
                                        "--geometry", g])
        assert res.exit_code == 0, res.output
        assert read_base(tmp_path / g / "s.ome.tiff").shape == shape

"""The whole-slide HER2 map as data: level-0 coordinates, QuPath GeoJSON, probability OME-TIFF, heat-map scale.

References: hand computations of the level-0 boxes, the pixels the model was given (read back from the
slide through the box), RFC 7946 (a schema of its Polygon FeatureCollection written here, and the
shoelace sign of each ring), brute-force nearest-centre loops, and tifffile reading the OME-TIFF back.
"""

from __future__ import annotations

import csv
import itertools
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from derestainer.inference import her2_map, slide_outputs
from derestainer.inference.plan import SlidePlan, TileSelection, plan_slide, read_model_region
from derestainer.inference.provenance import NOTE, software
from derestainer.inference.slide_options import SlideOptions
from derestainer.inference.slide_outputs import SlideOutputs, SlideResult, write_slide_outputs, write_tiles_csv
from derestainer.inference.slides import open_slide
from derestainer.inference.tiling import TileGrid

tifffile = pytest.importorskip("tifffile")

NAMES = ("0", "1+", "2+", "3+")


def _slide(path: Path, h: int = 128, w: int = 128, seed: int = 0) -> Path:
    """A tiny tiled RGB TIFF of noise (no resolution tags: the tests pass µm/px themselves)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    tifffile.imwrite(path, img, photometric="rgb", tile=(64, 64))
    return path


def _plan(slide_mpp: float, model_mpp: float, h: int, w: int, tile: int = 32, overlap: int = 8) -> SlidePlan:
    """A plan as :func:`plan_slide` makes it for a level-0 ``w × h`` slide read at level 0."""
    scale = model_mpp / slide_mpp
    ho, wo = max(1, round(h / scale)), max(1, round(w / scale))
    return SlidePlan(slide_mpp, "test", model_mpp, scale, 0, 1.0, ho, wo, TileGrid(ho, wo, tile, overlap))


def _probs(plan: SlidePlan, seed: int = 0, skip: tuple[tuple[int, int], ...] = ((0, 0),)) -> list:
    rng = np.random.default_rng(seed)
    g = plan.grid
    grid = [[[float(v) for v in rng.dirichlet(np.ones(4))] for _ in range(g.n_cols)] for _ in range(g.n_rows)]
    for i, j in skip:
        grid[i][j] = None
    return grid


# --------------------------------------------------------------------------------------------------
# Level-0 coordinates


@pytest.mark.parametrize("slide_mpp", [0.5, 0.4])  # factor 2, and a non-integer factor 2.5
def test_tile_boxes_in_level0_pixels_match_the_hand_computation(tmp_path: Path, slide_mpp: float) -> None:
    with open_slide(_slide(tmp_path / "s.tif")) as reader:
        plan = plan_slide(reader, 1.0, tile=32, overlap=8, slide_mpp=slide_mpp)
        size = reader.dimensions
    s = 1.0 / slide_mpp
    g = plan.grid
    assert plan.scale == pytest.approx(s) and (plan.width, plan.height) == (round(128 / s),) * 2
    for i in range(g.n_rows):
        for j in range(g.n_cols):
            x, y = int(g.xs[j]), int(g.ys[i])  # model pixels; the box is s× that, cut at the slide's edge
            expect = (x * s, y * s, min((x + 32) * s, 128.0) - x * s, min((y + 32) * s, 128.0) - y * s)
            assert her2_map.tile_box_level0(plan, i, j, size) == pytest.approx(expect)
    if slide_mpp == 0.5:  # by hand: xs = ys = [0, 24, 32]; tile (1, 2) is x 32…64, y 24…56 in model pixels
        assert list(g.xs) == [0, 24, 32] and her2_map.tile_box_level0(plan, 1, 2, size) == (64.0, 48.0, 64.0, 64.0)
    else:  # scale 2.5, output 51 px: xs = [0, 19]; tile (1, 1) is 19…51 → 47.5…127.5
        assert list(g.xs) == [0, 19] and her2_map.tile_box_level0(plan, 1, 1, size) == (47.5, 47.5, 80.0, 80.0)


def test_the_level0_box_is_where_the_model_pixels_came_from(tmp_path: Path) -> None:
    """Resampling the slide's own pixels over a tile's level-0 box gives the tile the model was given."""
    img = tifffile.imread(_slide(tmp_path / "s.tif"))
    with open_slide(tmp_path / "s.tif") as reader:
        plan = plan_slide(reader, 1.0, tile=32, overlap=8, slide_mpp=0.5)
        x0, y0, w0, h0 = her2_map.tile_box_level0(plan, 1, 1, reader.dimensions)  # interior: 48…112
        seen = read_model_region(reader, plan, int(plan.grid.ys[1]), int(plan.grid.xs[1]), 32, 32)

    def through(box: tuple[float, float, float, float]) -> np.ndarray:
        return np.asarray(Image.fromarray(img).resize((32, 32), Image.Resampling.LANCZOS, box=box)).astype(int)

    assert np.abs(through((x0, y0, x0 + w0, y0 + h0)) - seen).max() <= 1
    assert np.abs(through((x0 + 8, y0, x0 + w0 + 8, y0 + h0)) - seen).mean() > 10  # the check can fail


def test_tiles_csv_has_level0_and_model_columns(tmp_path: Path) -> None:
    plan = _plan(0.5, 1.0, 128, 128)
    probs = _probs(plan)
    g = plan.grid
    frac = np.linspace(0, 1, len(g)).reshape(g.n_rows, g.n_cols)
    run = np.array([[p is not None for p in row] for row in probs])
    write_tiles_csv(tmp_path / "t.csv", plan, frac, run, probs, NAMES, slide_size=(128, 128))
    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert len(rows) == len(g)
    assert not {"x", "y", "size"} & set(rows[0])  # the old model-pixel names are gone, not re-used
    r = next(r for r in rows if (r["row"], r["col"]) == ("1", "2"))
    assert (r["x_model"], r["y_model"], r["size_model"]) == ("32", "24", "32")
    assert (r["x0"], r["y0"], r["width0"], r["height0"]) == ("64", "48", "64", "64")
    assert float(r["expected_level"]) == pytest.approx(np.dot(probs[1][2], range(4)), abs=1e-4)
    first = rows[0]
    assert first["run"] == "0" and first["level"] == first["p_0"] == ""


# --------------------------------------------------------------------------------------------------
# GeoJSON for QuPath

#: RFC 7946 §3.1.6 / 3.2 / 3.3, for this file's shapes: a FeatureCollection of Polygon Features with
#: closed rings of ≥ 4 positions of ≥ 2 numbers.
_POSITION = {"type": "array", "minItems": 2, "items": {"type": "number"}}
_SCHEMA = {
    "type": "object", "required": ["type", "features"],
    "properties": {"type": {"const": "FeatureCollection"}, "features": {"type": "array", "items": {
        "type": "object", "required": ["type", "geometry", "properties"],
        "properties": {
            "type": {"const": "Feature"},
            "properties": {"type": ["object", "null"]},
            "geometry": {"type": "object", "required": ["type", "coordinates"], "properties": {
                "type": {"const": "Polygon"},
                "coordinates": {"type": "array", "items": {"type": "array", "minItems": 4, "items": _POSITION}},
            }},
        }}}},
}


def _shoelace(ring: list[list[float]]) -> float:
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in itertools.pairwise(ring))


def _write_geojson(tmp_path: Path) -> tuple[SlidePlan, list, np.ndarray, dict]:
    plan = _plan(0.4, 1.0, 128, 128)  # scale 2.5: fractional level-0 coordinates
    probs = _probs(plan, skip=((0, 0), (1, 0)))
    frac = np.full((plan.grid.n_rows, plan.grid.n_cols), 0.75)
    n = her2_map.write_geojson(tmp_path / "s.her2.geojson", plan, frac, probs, NAMES, slide_size=(128, 128))
    doc = json.loads((tmp_path / "s.her2.geojson").read_text())
    assert n == len(doc["features"])
    return plan, probs, frac, doc


def test_geojson_tiles_are_valid_rfc7946_polygons_in_level0_pixels(tmp_path: Path) -> None:
    plan, probs, _, doc = _write_geojson(tmp_path)
    assert doc["type"] == "FeatureCollection"
    tissue = [(i, j) for i, row in enumerate(probs) for j, p in enumerate(row) if p is not None]
    assert len(doc["features"]) == len(tissue) == len(plan.grid) - 2
    for f in doc["features"]:
        m = f["properties"]["measurements"]
        i, j = m["tile row"], m["tile col"]
        (ring,) = f["geometry"]["coordinates"]
        assert f["geometry"]["type"] == "Polygon" and len(ring) == 5 and ring[0] == ring[-1]  # closed
        assert _shoelace(ring) > 0  # counter-clockwise exterior (RFC 7946 §3.1.6)
        x, y = int(plan.grid.xs[j]), int(plan.grid.ys[i])  # model pixels; output 51 px, level-0 edge 127.5 < 128
        x0, y0, w0, h0 = x * 2.5, y * 2.5, (min(x + 32, 51) - x) * 2.5, (min(y + 32, 51) - y) * 2.5
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        assert (min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)) == pytest.approx((x0, y0, w0, h0))
        assert _shoelace(ring) == pytest.approx(w0 * h0)  # a rectangle, not a bow tie


def test_geojson_matches_a_schema_of_rfc7946(tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")
    _, _, _, doc = _write_geojson(tmp_path)
    jsonschema.validate(doc, _SCHEMA)
    bad = json.loads(json.dumps(doc))
    bad["features"][0]["geometry"]["coordinates"][0] = bad["features"][0]["geometry"]["coordinates"][0][:3]
    with pytest.raises(jsonschema.ValidationError):  # the schema has teeth
        jsonschema.validate(bad, _SCHEMA)


def test_geojson_carries_qupath_tile_objects_with_probabilities(tmp_path: Path) -> None:
    _, probs, _, doc = _write_geojson(tmp_path)
    for f in doc["features"]:
        props = f["properties"]
        m = props["measurements"]
        p = probs[m["tile row"]][m["tile col"]]
        assert props["objectType"] == "tile"
        assert all(isinstance(v, (int, float)) for v in m.values())  # QuPath ≥ 0.4: flat name → number
        assert [m[f"p({n})"] for n in NAMES] == pytest.approx(p, abs=1e-6)
        assert sum(m[f"p({n})"] for n in NAMES) == pytest.approx(1.0, abs=1e-5)
        assert m["expected level"] == pytest.approx(sum(k * v for k, v in enumerate(p)), abs=1e-6)
        assert m["tissue fraction"] == 0.75
        k = int(np.argmax(p))
        assert props["classification"] == {"name": f"HER2 {NAMES[k]}", "color": list(her2_map.LEVEL_COLOURS[k])}
        assert all(isinstance(c, int) and 0 <= c <= 255 for c in props["classification"]["color"])


# --------------------------------------------------------------------------------------------------
# The probability map OME-TIFF


def test_probability_raster_is_the_nearest_tile_per_stride_cell() -> None:
    plan = _plan(0.5, 1.0, 200, 180)  # output 90 × 100 model px; tile 32, stride 24
    probs = _probs(plan, skip=((0, 0), (2, 3)))
    r = her2_map.probability_raster(plan, probs)
    g = plan.grid
    assert r.shape == (5, -(-plan.height // 24), -(-plan.width // 24)) and r.dtype == np.float32
    for a in range(r.shape[1]):  # brute force: each cell's in-image centre, every tile's centre
        for b in range(r.shape[2]):
            cy, cx = (a * 24 + min(a * 24 + 24, plan.height)) / 2, (b * 24 + min(b * 24 + 24, plan.width)) / 2
            i = min(range(g.n_rows), key=lambda i: abs(cy - (g.ys[i] + 16)))
            j = min(range(g.n_cols), key=lambda j: abs(cx - (g.xs[j] + 16)))
            p = probs[i][j]
            if p is None:
                assert np.isnan(r[:, a, b]).all()
            else:
                np.testing.assert_allclose(r[:, a, b], [*p, np.dot(p, range(4))], rtol=1e-6)
    fine = her2_map.probability_raster(plan, probs, step=8)  # a finer grid: same values, resampled
    assert fine.shape == (5, -(-plan.height // 8), -(-plan.width // 8))


def test_probability_map_ome_tiff_reads_back_registered_to_the_slide(tmp_path: Path) -> None:
    plan = _plan(0.25, 1.0, 120, 96, tile=16, overlap=4)  # scale 4: output 30 × 24 model px; stride 12
    probs = _probs(plan)
    out = tmp_path / "s.her2.ome.tiff"
    info = her2_map.write_probability_map(out, plan, probs, NAMES, name="HER2 probabilities of s.svs")
    assert info == {"shape": [5, 3, 2], "step_model_px": 12, "mpp": 12.0}
    assert [p.name for p in tmp_path.iterdir()] == ["s.her2.ome.tiff"]  # atomic: no temporary left
    with tifffile.TiffFile(out) as tf:
        assert tf.is_ome and tf.series[0].axes == "CYX"
        data = tf.series[0].asarray()
        ome = ET.fromstring(tf.ome_metadata)
        xres = tf.pages[0].tags["XResolution"].value
    np.testing.assert_array_equal(data, her2_map.probability_raster(plan, probs), strict=True)
    ns = {"o": ome.tag.split("}")[0].strip("{")}
    pixels = ome.find(".//o:Pixels", ns)
    assert pixels is not None
    # level-0 µm/px × level-0 pixels per cell: 0.25 × (4 × 12) = 12 µm
    assert float(pixels.get("PhysicalSizeX")) == float(pixels.get("PhysicalSizeY")) == pytest.approx(0.25 * 4 * 12)
    assert pixels.get("PhysicalSizeXUnit") == "µm" and pixels.get("Type") == "float"
    assert [c.get("Name") for c in pixels.findall("o:Channel", ns)] == ["p(0)", "p(1+)", "p(2+)", "p(3+)", "expected level"]
    assert xres[0] / xres[1] == pytest.approx(1e4 / 12.0)  # pixels per cm, for readers without OME
    assert ome.get("Creator") == software() and ome.find("o:StructuredAnnotations", ns) is None  # no record given


def test_probability_map_carries_the_slides_provenance_at_its_own_scale(tmp_path: Path) -> None:
    """The map says what made it and what it is, like the virtual IHC: the slide's record with the map's
    µm/px and the magnification equivalent to it (40× at 0.25 µm/px → 12 µm/px: 0.8333×)."""
    plan = _plan(0.25, 1.0, 120, 96, tile=16, overlap=4)
    record = {"note": NOTE, "virtual_stain": True, "model_sha256": "ab" * 32, "source_slide": "s.svs",
              "source_slide_mpp": 0.25, "source_objective_power": 40.0, "output_mpp": 1.0, "output_magnification": 10.0}
    out = tmp_path / "s.her2.ome.tiff"
    her2_map.write_probability_map(out, plan, _probs(plan), NAMES, name="HER2 probabilities of s.svs", provenance=record)
    with tifffile.TiffFile(out) as tf:
        xml = tf.ome_metadata
        assert {p.tags["Software"].value for p in tf.pages} == {software()}
        np.testing.assert_array_equal(tf.series[0].asarray(), her2_map.probability_raster(plan, _probs(plan)), strict=True)
    ome = ET.fromstring(xml)
    ns = {"o": ome.tag.split("}")[0].strip("{")}
    assert ome.get("Creator") == software()
    assert ome.findtext("o:Image/o:Description", namespaces=ns) == NOTE
    entries = {m.get("K"): m.text for m in ome.findall("o:StructuredAnnotations/o:MapAnnotation/o:Value/o:M", ns)}
    assert entries["output_mpp"] == "12" and entries["model_sha256"] == "ab" * 32 and entries["note"] == NOTE
    assert entries["content"].startswith("HER2 level probabilities per tile")
    assert float(entries["output_magnification"]) == round(40 * 0.25 / 12, 4)
    (objective,) = ome.findall("o:Instrument/o:Objective", ns)
    assert float(objective.get("NominalMagnification", "")) == round(40 * 0.25 / 12, 4)
    assert record["output_mpp"] == 1.0  # the slide's record is not changed
    pytest.importorskip("xmlschema", reason="xmlschema not installed: OME schema validation skipped")
    ome_types = pytest.importorskip("ome_types", reason="ome-types not installed: OME schema validation skipped")
    model = ome_types.from_xml(xml, validate=True)
    assert [c.name for c in model.images[0].pixels.channels] == ["p(0)", "p(1+)", "p(2+)", "p(3+)", "expected level"]
    assert [t.ifd for t in model.images[0].pixels.tiff_data_blocks] == [0]


# --------------------------------------------------------------------------------------------------
# The PNG heat map


def test_heatmap_colour_range_comes_from_the_data() -> None:
    v = np.array([[np.nan, 1.2], [1.7, 1.45]])
    assert her2_map.heatmap_range(v, 4) == (1.2, 1.7)
    assert her2_map.heatmap_range(v, 4, "fixed") == (0.0, 3.0)
    assert her2_map.heatmap_range(np.full((2, 2), np.nan), 4) == (0.0, 3.0)  # nothing shown
    assert her2_map.heatmap_range(np.array([2.0]), 4) == pytest.approx((1.95, 2.05))  # flat: widened
    assert her2_map.heatmap_range(np.array([0.01]), 4) == pytest.approx((0.0, 0.1))  # kept inside 0 … 3
    assert her2_map.heatmap_range(np.array([3.0]), 4) == pytest.approx((2.9, 3.0))


def test_heatmap_colourbar_is_labelled_in_her2_levels() -> None:
    assert her2_map.colourbar_ticks(1.2, 2.7, NAMES) == ([1.2, 2.0, 2.7], ["1.20", "2+", "2.70"])
    assert her2_map.colourbar_ticks(0.0, 3.0, NAMES) == ([0.0, 1.0, 2.0, 3.0], list(NAMES))
    assert her2_map.colourbar_ticks(0.98, 1.6, NAMES)[1] == ["0.98", "1.60"]  # 1+ would sit on the end label


def test_heatmap_title_names_the_call_and_the_virtual_stain() -> None:
    t = her2_map.heatmap_title("s.svs", "2+")
    assert t == "s.svs — slide-level call: HER2 2+\nvirtual stain — not a real IHC"
    assert her2_map.heatmap_title("", None) == "virtual stain — not a real IHC"


# --------------------------------------------------------------------------------------------------
# Wiring: write_slide_outputs


def _result(tmp_path: Path, probs: list, **options) -> SlideResult:
    plan = _plan(0.5, 1.0, 128, 128)
    g = plan.grid
    run = np.array([[p is not None for p in row] for row in probs]) if probs else np.ones((g.n_rows, g.n_cols), bool)
    sel = TileSelection(np.full((32, 32, 3), 200, np.uint8), 2.0, np.ones((32, 32), bool),
                        np.full((g.n_rows, g.n_cols), 0.5), run)
    probs_grid = probs or [[None] * g.n_cols for _ in range(g.n_rows)]
    return SlideResult(tmp_path / "s.svs", SlideOutputs.for_tiff(tmp_path / "s.ome.tiff"), "test", (128, 128),
                       tmp_path / "m.safetensors", "cpu", NAMES, plan, SlideOptions(tile=32, overlap=8, **options), sel,
                       probs_grid, {}, resumed=False, computed_tiles=int(run.sum()), model_seconds=0.0, seconds=0.0)


def test_write_slide_outputs_writes_the_her2_map_files(tmp_path: Path) -> None:
    r = _result(tmp_path, _probs(_plan(0.5, 1.0, 128, 128)))
    outs = r.outs
    assert (outs.geojson.name, outs.her2_map.name) == ("s.her2.geojson", "s.her2.ome.tiff")
    assert {outs.geojson, outs.her2_map} <= set(outs.files())  # guarded against overlap like the rest
    summary = write_slide_outputs(r)
    assert all(p.is_file() for p in (outs.heatmap, outs.tiles_csv, outs.summary, outs.geojson, outs.her2_map))
    assert len(json.loads(outs.geojson.read_text())["features"]) == len(r.plan.grid) - 1
    assert summary["predicted_level"] in NAMES
    # a model without a level head: no map of an earlier run is left beside the new outputs
    write_slide_outputs(_result(tmp_path, []))
    assert not outs.geojson.exists() and not outs.her2_map.exists() and not outs.heatmap.exists()
    assert outs.tiles_csv.is_file() and outs.summary.is_file()


def test_map_mpp_sets_the_probability_maps_cell(tmp_path: Path) -> None:
    from derestainer.core.errors import SlideError

    probs = _probs(_plan(0.5, 1.0, 128, 128))  # model 1 µm/px, 64 × 64 model px, stride 24
    for map_mpp, step in ((None, 24), (8.0, 8), (7.4, 7), (0.2, 1)):  # rounded to whole model pixels, at least one
        r = _result(tmp_path, probs, map_mpp=map_mpp)
        write_slide_outputs(r)
        with tifffile.TiffFile(r.outs.her2_map) as tf:
            data = tf.series[0].asarray()
            ome = ET.fromstring(tf.ome_metadata)
        np.testing.assert_array_equal(data, her2_map.probability_raster(r.plan, probs, step=step), strict=True)
        pixels = ome.find(".//{*}Pixels")
        assert pixels is not None and float(pixels.get("PhysicalSizeX", "")) == step * 1.0
    with pytest.raises(SlideError, match="--map-mpp must be positive"):
        SlideOptions(map_mpp=0.0).map_step(1.0)


def test_write_heatmap_passes_the_call_and_data_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict = {}
    real_range, real_title = slide_outputs.heatmap_range, slide_outputs.heatmap_title
    monkeypatch.setattr(slide_outputs, "heatmap_range", lambda *a: seen.setdefault("range", real_range(*a)))
    monkeypatch.setattr(slide_outputs, "heatmap_title", lambda *a: seen.setdefault("title", real_title(*a)))
    r = _result(tmp_path, _probs(_plan(0.5, 1.0, 128, 128)))
    summary = write_slide_outputs(r)
    values = slide_outputs.heatmap_grid(r.probs_grid)
    assert seen["range"] == (np.nanmin(values), np.nanmax(values))  # every tile is shown (all tissue)
    assert seen["title"] == f"s.svs — slide-level call: HER2 {summary['predicted_level']}\n{her2_map.DISCLAIMER}"
    with Image.open(r.outs.heatmap) as im:
        assert im.format == "PNG"

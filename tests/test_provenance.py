"""Provenance of virtual-IHC whole-slide outputs (inference.provenance): OME-XML, TIFF tags, summary JSON.

The OME-XML is checked with the standard library's XML parser always, against the OME 2016-06 schema
and ome-types' model when those are installed (xmlschema, ome-types), and the files are opened by
tifffile, tiffslide and OpenSlide. Source slides are tiny (≤ 128 px) and written here.
"""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from derestainer.core.config import load_config, replace
from derestainer.core.version import __version__
from derestainer.inference import slides
from derestainer.inference.loading import load_model
from derestainer.inference.ometiff import PyramidOptions, level_shapes, write_pyramid
from derestainer.inference.provenance import NAMESPACE, NOTE, map_value, output_magnification, slide_fingerprint
from derestainer.inference.slide_options import SlideOptions
from derestainer.inference.slides import open_slide
from derestainer.inference.wsi import translate_slide
from derestainer.models.files import save_generator
from test_wsi import FAST, FP32, make_model, synth_slide, write_slide

tifffile = pytest.importorskip("tifffile")

NS = {"ome": "http://www.openmicroscopy.org/Schemas/OME/2016-06"}
#: Every key of the provenance record (docs/inference.md, "Provenance").
KEYS = {"note", "virtual_stain", "stain", "software", "created", "model_file", "model_sha256", "model_architecture",
        "model_training_step", "model_training_data", "model_mpp", "output_mpp", "source_slide",
        "source_slide_bytes", "source_slide_mtime", "source_slide_fingerprint", "source_slide_fingerprint_method",
        "source_slide_mpp", "source_objective_power", "output_magnification"}
OPTS = {"tile": 32, "overlap": 8, "compression": "lossless", "all_tiles": True, "out_tile": 16, **FAST, **FP32}

#: A source OME-TIFF's XML written by hand (not by the code under test): 40× objective, 0.25 µm/px.
SOURCE_OME = """<?xml version="1.0" encoding="UTF-8"?>
<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">
<Instrument ID="Instrument:0"><Objective ID="Objective:0:0" NominalMagnification="40.0"/></Instrument>
<Image ID="Image:0" Name="scan"><InstrumentRef ID="Instrument:0"/><ObjectiveSettings ID="Objective:0:0"/>
<Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" SizeX="128" SizeY="128" SizeC="3" SizeZ="1" SizeT="1"
 Interleaved="true" PhysicalSizeX="0.25" PhysicalSizeXUnit="µm" PhysicalSizeY="0.25" PhysicalSizeYUnit="µm">
<Channel ID="Channel:0:0" SamplesPerPixel="3"/><TiffData IFD="0" PlaneCount="1"/></Pixels></Image></OME>"""


def source_ome_40x(path: Path) -> Path:
    """A 128 px OME-TIFF scanned (says its OME-XML) with a 40× objective at 0.25 µm/px."""
    tifffile.imwrite(path, synth_slide(128, 128), tile=(64, 64), photometric="rgb", metadata=None,
                     description=SOURCE_OME.encode("utf-8"), resolution=(4e4, 4e4), resolutionunit="CENTIMETER")
    return path


def trained_model(path: Path, mpp: float) -> Path:
    """make_model's tiny generator saved as a training checkpoint would save it: step and dataset recorded."""
    make_model(path, mpp)
    lm = load_model(path, "cpu", fast=False)
    cfg = replace(load_config("tiny"), model={"name": "_tw_fcn"}, data={"mpp": mpp, "size": 64, "root": "/data/BCI_dataset"})
    return save_generator(path, lm.model, cfg, extra={"step": 1234, "epoch": 5})


def ome_root(path: Path) -> ET.Element:
    with tifffile.TiffFile(path) as tf:
        assert tf.is_ome
        return ET.fromstring(tf.pages[0].description)


def map_annotation(root: ET.Element) -> dict[str, str]:
    """The derestainer MapAnnotation of an OME-XML root, checked to be linked from the Image."""
    (ann,) = root.findall("ome:StructuredAnnotations/ome:MapAnnotation", NS)
    assert ann.get("Namespace") == NAMESPACE
    refs = [r.get("ID") for r in root.findall("ome:Image/ome:AnnotationRef", NS)]
    assert refs == [ann.get("ID")]
    return {m.get("K"): m.text or "" for m in ann.findall("ome:Value/ome:M", NS)}


def validate_ome(xml: str) -> Any:
    """The OME model of ``xml``, validated against the OME 2016-06 schema (ome-types + xmlschema)."""
    pytest.importorskip("xmlschema", reason="xmlschema not installed: OME schema validation skipped")
    ome_types = pytest.importorskip("ome_types", reason="ome-types not installed: OME schema validation skipped")
    ome_types.validate_xml(xml)  # raises on a schema violation (offline: ome-types ships the XSD)
    return ome_types.from_xml(xml, validate=True)


# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Translated:
    slide: Path
    model: Path
    out: Path
    summary: dict


@pytest.fixture(scope="module")
def ome_40x(tmp_path_factory: pytest.TempPathFactory) -> Translated:
    """The 40× OME source translated by a model recording its training step and data."""
    d = tmp_path_factory.mktemp("ome40x")
    slide = source_ome_40x(d / "scan.ome.tif")
    mf = trained_model(d / "m.safetensors", mpp=0.5)
    out = d / "out" / "scan.ome.tiff"  # model geometry: the output's magnification differs from the scan's
    return Translated(slide, mf, out, translate_slide(load_model(mf, "cpu", precision="fp32"), slide, out,
                                                     SlideOptions(**OPTS, geometry="model")))


@pytest.fixture(scope="module")
def ome_unknown(tmp_path_factory: pytest.TempPathFactory) -> Translated:
    """A TIFF stating no objective power, translated by a model file without step or training data."""
    d = tmp_path_factory.mktemp("omeunknown")
    slide = write_slide(d / "s.tif", 96, 128, mpp=0.5, levels=1, tile=64)
    mf = make_model(d / "m.safetensors", mpp=0.5)
    out = d / "s.ome.tiff"
    return Translated(slide, mf, out, translate_slide(load_model(mf, "cpu", precision="fp32"), slide, out,
                                                     SlideOptions(**OPTS)))


def test_ome_output_carries_provenance_and_magnification(ome_40x: Translated) -> None:
    slide, mf, out, s = ome_40x.slide, ome_40x.model, ome_40x.out, ome_40x.summary
    with open_slide(slide) as r:  # the OME source's objective is read
        assert r.objective_power == 40.0 and r.mpp == pytest.approx(0.25)
    prov = s["provenance"]
    assert set(prov) == KEYS and prov["note"] == NOTE and prov["virtual_stain"] is True
    assert prov["model_sha256"] == hashlib.sha256(mf.read_bytes()).hexdigest()
    assert prov["software"] == f"derestainer {__version__}"
    assert prov["model_training_step"] == 1234 and prov["model_training_data"] == "BCI_dataset (bci, split train)"
    assert prov["model_mpp"] == prov["output_mpp"] == 0.5 and prov["source_slide_mpp"] == pytest.approx(0.25)
    assert prov["source_slide"] == "scan.ome.tif" and prov["source_slide_bytes"] == slide.stat().st_size
    assert prov["source_slide_fingerprint"] == slide_fingerprint(slide)
    assert prov["source_objective_power"] == 40.0 and prov["output_magnification"] == 20.0  # 40× at 0.25 → 0.5 µm/px
    assert prov["created"].endswith("Z") and prov["created"][:4].isdigit()
    assert json.loads((out.parent / "scan.summary.json").read_text())["provenance"] == prov
    assert "provenance" not in s["pyramid"]

    root = ome_root(out)
    assert root.get("Creator") == f"derestainer {__version__}"
    image = root.find("ome:Image", NS)
    assert image is not None and image.get("Name") == "scan.ome.tif — virtual HER2 IHC (derestainer)"
    assert image.findtext("ome:Description", namespaces=NS) == NOTE
    (objective,) = root.findall("ome:Instrument/ome:Objective", NS)
    assert float(objective.get("NominalMagnification", "")) == 20.0
    settings = image.find("ome:ObjectiveSettings", NS)
    assert settings is not None and settings.get("ID") == objective.get("ID")
    assert map_annotation(root) == {k: map_value(v) for k, v in prov.items()}

    with tifffile.TiffFile(out) as tf:
        levels = [lv.asarray() for lv in tf.series[0].levels]  # every resolution, from the SubIFDs
        assert {lv.keyframe.tags["Software"].value for lv in tf.series[0].levels} == {f"derestainer {__version__}"}
    assert [lv.shape for lv in levels] == [(64, 64, 3), (32, 32, 3), (16, 16, 3)]


def test_unknown_magnification_writes_no_objective_and_openslide_reads_the_output(ome_unknown: Translated) -> None:
    openslide = pytest.importorskip("openslide")
    tiffslide = pytest.importorskip("tiffslide")
    out, prov = ome_unknown.out, ome_unknown.summary["provenance"]
    assert prov["source_objective_power"] is None and prov["output_magnification"] is None
    assert prov["model_training_step"] is None and prov["model_training_data"] is None  # not in this file
    assert prov["model_sha256"] == hashlib.sha256(ome_unknown.model.read_bytes()).hexdigest()
    root = ome_root(out)
    assert root.find("ome:Instrument", NS) is None and "NominalMagnification" not in ET.tostring(root, "unicode")
    entries = map_annotation(root)
    assert set(entries) == KEYS and entries["source_objective_power"] == "unknown" and entries["note"] == NOTE
    sl = openslide.OpenSlide(str(out))
    assert sl.dimensions == (128, 96) and float(sl.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    ts = tiffslide.TiffSlide(str(out))
    assert ts.level_dimensions == ((128, 96), (64, 48), (32, 24), (16, 12))


def test_ome_outputs_validate_against_the_ome_schema(ome_40x: Translated, ome_unknown: Translated, tmp_path: Path) -> None:
    """ome-types (its bundled OME 2016-06 XSD, through xmlschema/lxml) validates and reads the files."""
    plain = tmp_path / "plain.ome.tiff"  # write_pyramid without provenance
    write_pyramid(plain, iter([np.zeros((40, 48, 3), np.uint8)]), 40, 48, 0.25, work_dir=tmp_path / "wk",
                  options=PyramidOptions(tile=16))
    models = {}
    for name, out in (("40x", ome_40x.out), ("unknown", ome_unknown.out), ("plain", plain)):
        with tifffile.TiffFile(out) as tf:
            models[name] = validate_ome(tf.ome_metadata)
    assert models["plain"].structured_annotations.map_annotations == []
    m40 = models["40x"]
    assert m40.images[0].name == "scan.ome.tif — virtual HER2 IHC (derestainer)"
    assert m40.instruments[0].objectives[0].nominal_magnification == 20.0
    kv = m40.structured_annotations.map_annotations[0].value
    assert {m.k: m.value for m in kv.ms} == map_annotation(ome_root(ome_40x.out))
    assert models["unknown"].instruments == []


def test_openslide_layout_has_provenance_json_in_its_description(tmp_path: Path) -> None:
    openslide = pytest.importorskip("openslide")
    slide = write_slide(tmp_path / "s.tif", 64, 96, mpp=0.5, levels=1, tile=64)
    mf = make_model(tmp_path / "m.safetensors", mpp=0.5)
    out = tmp_path / "o" / "s.tif"
    s = translate_slide(load_model(mf, "cpu", precision="fp32"), slide, out, SlideOptions(**{**OPTS, "layout": "openslide"}))
    sl = openslide.OpenSlide(str(out))
    assert sl.level_count == len(level_shapes(64, 96, 16)) == 4  # every level: top-level pages
    desc = json.loads(sl.properties["tiff.ImageDescription"])
    assert desc.pop("name") == "s.tif — virtual HER2 IHC (derestainer)" and desc == s["provenance"]
    assert desc["note"] == NOTE and desc["model_sha256"] == hashlib.sha256(mf.read_bytes()).hexdigest()
    assert sl.properties["tiff.Software"] == f"derestainer {__version__}"


def test_write_pyramid_without_provenance_is_plain_ome(tmp_path: Path, rng: np.random.Generator) -> None:
    img = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    out = tmp_path / "p.ome.tiff"
    info = write_pyramid(out, iter([img]), 40, 48, 0.25, work_dir=tmp_path / "wk", options=PyramidOptions(tile=16, compression="lossless"))
    assert info["provenance"] is None
    root = ome_root(out)
    assert root.get("Creator") == f"derestainer {__version__}" and root.find("ome:StructuredAnnotations", NS) is None
    pixels = root.find("ome:Image/ome:Pixels", NS)
    assert pixels is not None and pixels.get("PhysicalSizeX") == "0.25" and pixels.get("PhysicalSizeXUnit") == "µm"
    with tifffile.TiffFile(out) as tf:
        np.testing.assert_array_equal(tf.series[0].levels[0].asarray(), img)
        assert len(tf.series[0].levels) == 3


@pytest.mark.parametrize("size", [0, 700, 1000, 2000, 2345])
def test_slide_fingerprint_is_sha256_of_size_head_and_tail(tmp_path: Path, size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    part = 1000
    ref = hashlib.sha256(f"{size}\n".encode() + data[:part] + data[max(part, size - part):]).hexdigest()
    assert slide_fingerprint(p, part=part) == ref
    if size <= 2 * part:  # a small file: every byte, once
        assert ref == hashlib.sha256(f"{size}\n".encode() + data).hexdigest()


def test_output_magnification_scales_with_pixel_size() -> None:
    assert output_magnification(40, 0.25, 0.25) == 40
    assert output_magnification(40, 0.25, 0.5) == 20
    assert output_magnification(20, 0.5, 0.46) == pytest.approx(21.74)
    assert output_magnification(None, 0.25, 0.5) is None and output_magnification(0, 0.25, 0.5) is None


def test_readers_report_the_objective_power(tmp_path: Path) -> None:
    """Aperio ``AppMag`` through OpenSlide (``openslide.objective-power``) and tifffile; none when unstated."""
    openslide = pytest.importorskip("openslide")
    desc = "Aperio Image Library v12.0.15\r\n128x128 [0,0 128x128] (64x64) JPEG/RGB Q=70|AppMag = 40|MPP = 0.2500"
    svs = tmp_path / "a.svs"
    tifffile.imwrite(svs, synth_slide(128, 128), tile=(64, 64), photometric="rgb", compression="jpeg",
                     description=desc, metadata=None)
    assert float(openslide.OpenSlide(str(svs)).properties["openslide.objective-power"]) == 40
    with open_slide(svs) as r:
        assert isinstance(r, slides.OpenSlideReader) and r.objective_power == 40.0
    with slides.TiffReader(svs) as r:
        assert r.objective_power == 40.0
    with open_slide(write_slide(tmp_path / "plain.tif", 64, 64, mpp=0.5, levels=1, tile=64)) as r:
        assert r.objective_power is None

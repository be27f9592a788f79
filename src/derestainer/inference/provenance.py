"""Provenance of a virtual-IHC whole-slide output: what made it, from what, and when.

A virtual IHC must never be taken for a real stain. :func:`slide_provenance` makes one flat record
(JSON types, ``None`` where unknown) that :func:`~.ometiff.write_pyramid` writes into the TIFF and
the summary JSON repeats under ``"provenance"``:

- ``ome`` layout: an OME ``MapAnnotation`` (namespace :data:`NAMESPACE`) linked from the Image by an
  ``AnnotationRef``; the Image's Name and Description say it is a virtual stain; ``OME/@Creator`` is
  derestainer; an ``Instrument/Objective`` with ``NominalMagnification`` when the source's
  objective power is known (:func:`ome_xml` writes the whole OME-XML; no third-party model library).
- ``openslide`` layout: the record as JSON in ImageDescription (:func:`description_json`).
- both: the TIFF Software tag is :func:`software`.

Choices (docs/inference.md, "Provenance"):

- **Source slide.** Hashing a multi-GB slide costs more than translating a small one, so the slide is
  named by its size, mtime and a *fingerprint*: SHA-256 over the decimal size and a newline, the
  first MiB and the last MiB (each byte at most once; all of a file of ≤ 2 MiB). It tells slides
  apart and notices most changes; it is not the file's SHA-256. A multi-file format (MRXS, VMS)
  is fingerprinted by the file given. The model file, small, gets its full SHA-256.
- **Magnification.** ``NominalMagnification`` is written as the magnification *equivalent* to the
  output's level 0: the source objective power × slide µm/px ÷ output µm/px (e.g. a 40× scan at
  0.25 µm/px translated at 0.5 µm/px is written 20×), because viewers (QuPath) take it as the
  magnification of the full-resolution image. The source's own power is kept in
  ``source_objective_power``. Unknown power: no Instrument/Objective at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from derestainer.core.io import file_sha256
from derestainer.core.version import __version__

if TYPE_CHECKING:
    from derestainer.inference.loading import LoadedModel

#: The note every output carries.
NOTE = "virtual IHC generated from H&E by a neural network — not a real stain"
#: Namespace of the OME MapAnnotation holding the provenance.
NAMESPACE = "derestainer.provenance"
OME_NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"
FINGERPRINT_BYTES = 1 << 20
FINGERPRINT_METHOD = "sha256 of the decimal size + newline, the first MiB and the last MiB"


def software() -> str:
    """``derestainer <version>``: the TIFF Software tag and the OME Creator."""
    return f"derestainer {__version__}"


def slide_fingerprint(path: str | os.PathLike[str], part: int = FINGERPRINT_BYTES) -> str:
    """Cheap fingerprint of a (large) file: SHA-256 of its size, first and last ``part`` bytes (module docstring)."""
    size = os.path.getsize(path)
    h = hashlib.sha256(f"{size}\n".encode())
    with open(path, "rb") as f:
        h.update(f.read(part))
        if size > part:
            f.seek(max(part, size - part))
            h.update(f.read())
    return h.hexdigest()


def utc_iso(t: datetime | float | None = None) -> str:
    """UTC time as ISO 8601 to the second (``2026-12-03T06:00:00Z``); now when ``t`` is None."""
    if t is None:
        t = datetime.now(timezone.utc)
    elif not isinstance(t, datetime):
        t = datetime.fromtimestamp(t, timezone.utc)
    return t.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def output_magnification(objective_power: float | None, slide_mpp: float, output_mpp: float) -> float | None:
    """Magnification equivalent to the output's level 0 (module docstring), 4 significant digits."""
    if objective_power is None or objective_power <= 0 or slide_mpp <= 0 or output_mpp <= 0:
        return None
    return float(f"{objective_power * slide_mpp / output_mpp:.4g}")


def slide_provenance(lm: LoadedModel, slide: str | os.PathLike[str], *, slide_mpp: float, output_mpp: float,
                     objective_power: float | None = None, created: datetime | None = None,
                     normalization: dict[str, Any] | None = None) -> dict[str, Any]:
    """The provenance record of one translated slide (keys in docs/inference.md, "Provenance").

    ``normalization``: the stain normalisation of the input (:mod:`.normalize`), stored under
    ``"normalization"``; the key is absent without one.
    """
    p = Path(slide)
    st = p.stat()
    record = {
        "note": NOTE,
        "virtual_stain": True,
        "stain": "HER2 IHC (virtual)",
        "software": software(),
        "created": utc_iso(created),
        "model_file": lm.path.name,
        "model_sha256": lm.sha256 or file_sha256(lm.path),
        "model_architecture": lm.meta.get("model"),
        "model_training_step": lm.step,
        "model_training_data": lm.training_data,
        "model_mpp": lm.mpp,
        "output_mpp": output_mpp,
        "source_slide": p.name,
        "source_slide_bytes": st.st_size,
        "source_slide_mtime": utc_iso(st.st_mtime),
        "source_slide_fingerprint": slide_fingerprint(p),
        "source_slide_fingerprint_method": FINGERPRINT_METHOD,
        "source_slide_mpp": slide_mpp,
        "source_objective_power": objective_power,
        "output_magnification": output_magnification(objective_power, slide_mpp, output_mpp),
    }
    return record if normalization is None else {**record, "normalization": normalization}


def map_provenance(provenance: Mapping[str, Any], map_mpp: float) -> dict[str, Any]:
    """The record of a slide's HER2 probability map (``NAME.her2.ome.tiff``): the slide's, at the map's
    µm/px and magnification, and saying what its channels are."""
    power, slide_mpp = provenance.get("source_objective_power"), provenance.get("source_slide_mpp")
    return {**provenance, "content": "HER2 level probabilities per tile predicted from H&E, and their expected level",
            "output_mpp": map_mpp,
            "output_magnification": (output_magnification(power, slide_mpp, map_mpp)
                                     if isinstance(slide_mpp, (int, float)) else None)}


def map_value(v: Any) -> str:
    """A provenance value as the text of an OME MapAnnotation entry (``unknown`` for None)."""
    if v is None:
        return "unknown"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return format(v, ".10g")
    if isinstance(v, (dict, list)):  # a nested record (normalization): as JSON
        return json.dumps(v, ensure_ascii=False)
    return str(v)


def description_json(name: str, provenance: Mapping[str, Any]) -> bytes:
    """ImageDescription of the ``openslide`` layout: ``{"name": ..., <provenance>}`` as ASCII JSON."""
    return json.dumps({"name": name, **provenance}, ensure_ascii=True).encode("ascii")


def _num(v: float) -> str:
    return repr(float(v))


def ome_xml(name: str, width: int, height: int, mpp: float, provenance: Mapping[str, Any] | None = None, *,
            channels: Sequence[str] | None = None) -> bytes:
    """The OME-XML (2016-06, UTF-8) of one image: interleaved RGB uint8 in IFD 0 (pyramid in its SubIFDs),
    or with ``channels`` one float32 plane per named channel, in IFDs 0, 1, … (a map, not a stain).

    With ``provenance``: the Image's Description is :data:`NOTE`, a MapAnnotation holds the record,
    and an Objective carries ``provenance["output_magnification"]`` when it is known.
    """
    root = ET.Element("OME", {
        "xmlns": OME_NS, "xmlns:xsi": "http://www.w3.org/2001/XMLSchema-instance",
        "xsi:schemaLocation": f"{OME_NS} {OME_NS}/ome.xsd",
        "UUID": f"urn:uuid:{uuid.uuid4()}", "Creator": software()})
    prov = dict(provenance or {})
    magnification = prov.get("output_magnification")
    if magnification is not None:
        ET.SubElement(ET.SubElement(root, "Instrument", ID="Instrument:0"), "Objective",
                      ID="Objective:0:0", NominalMagnification=_num(magnification))
    image = ET.SubElement(root, "Image", ID="Image:0", Name=name)
    if prov:
        ET.SubElement(image, "Description").text = NOTE
    if magnification is not None:
        ET.SubElement(image, "InstrumentRef", ID="Instrument:0")
        ET.SubElement(image, "ObjectiveSettings", ID="Objective:0:0")
    kind = ({"Type": "uint8", "SignificantBits": "8", "Interleaved": "true", "SizeC": "3"} if channels is None else
            {"Type": "float", "SignificantBits": "32", "Interleaved": "false", "SizeC": str(len(channels))})
    pixels = ET.SubElement(image, "Pixels", {
        "ID": "Pixels:0", "DimensionOrder": "XYCZT", **kind,
        "SizeX": str(width), "SizeY": str(height), "SizeZ": "1", "SizeT": "1",
        "PhysicalSizeX": _num(mpp), "PhysicalSizeXUnit": "µm", "PhysicalSizeY": _num(mpp), "PhysicalSizeYUnit": "µm"})
    if channels is None:
        ET.SubElement(pixels, "Channel", ID="Channel:0:0", SamplesPerPixel="3")
    for c, channel in enumerate(channels or ()):
        ET.SubElement(pixels, "Channel", ID=f"Channel:0:{c}", Name=channel, SamplesPerPixel="1")
    ET.SubElement(pixels, "TiffData", IFD="0", PlaneCount="1" if channels is None else str(len(channels)))
    if prov:
        ET.SubElement(image, "AnnotationRef", ID="Annotation:0")
        ann = ET.SubElement(ET.SubElement(root, "StructuredAnnotations"), "MapAnnotation",
                            ID="Annotation:0", Namespace=NAMESPACE)
        ET.SubElement(ann, "Description").text = "derestainer provenance: " + NOTE
        value = ET.SubElement(ann, "Value")
        for k, v in prov.items():
            ET.SubElement(value, "M", K=k).text = map_value(v)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode").encode("utf-8")


__all__ = ["FINGERPRINT_METHOD", "NAMESPACE", "NOTE", "description_json", "map_provenance", "map_value", "ome_xml",
           "output_magnification", "slide_fingerprint", "slide_provenance", "software", "utc_iso"]

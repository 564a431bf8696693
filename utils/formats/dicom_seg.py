"""DICOM-SEG output: ``masks/<id>_seg.dcm``, a mask written as a DICOM Segmentation that references its source series
(:func:`write_dicom_seg`, the writer of the ``dicom`` format; :mod:`utils.formats.dicom` reads DICOM).

The same mask of the same series gives the same bytes: UIDs are derived from the source UIDs and the mask, dates are
the source's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np

from utils import fileio
from utils.formats.base import SOFTWARE, class_indices

log = logging.getLogger(__name__)

_DATE_SOURCES = (("ContentDate", "ContentTime"), ("SeriesDate", "SeriesTime"), ("StudyDate", "StudyTime"))


def write_dicom_seg(mask: np.ndarray, case: dict, output_dir: str | os.PathLike) -> list[Path]:
    """``masks/<id>_seg.dcm``: a DICOM-SEG (one segment per class) referencing the source series.

    Segment numbers are the classes ``1..K`` (source values mapped back through ``label_values``), named by the
    dataset's labels. Series whose files lack the UIDs a SEG must reference get no SEG (a warning says so);
    ``masks/<id>.nii.gz`` holds the mask anyway. The same mask of the same series gives the same bytes: the SEG's
    UIDs are derived from the source UIDs and the mask (:func:`_deterministic`), and its content date and time are
    the source's (content, else series, else study date); only a series without any date gets the time of writing.
    """
    import pydicom

    writer = case["writer"]
    classes = class_indices(mask, writer.get("label_values"))
    labels = writer.get("labels") or {}
    count = max(int(classes.max(initial=0)), len(labels) - 1)
    if count == 0:
        log.warning("%s: empty mask, no DICOM-SEG written", case["id"])
        return []
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every attribute it copies at INFO
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
            sources = [pydicom.dcmread(f) for f in writer["files"]]
            seg = _segmentation(sources, classes, labels, count)
    except (ValueError, KeyError, AttributeError, TypeError) as error:
        log.warning("%s: no DICOM-SEG written (%s: %s)", case["id"], type(error).__name__, error)
        return []
    path = Path(output_dir) / "masks" / f"{case['id']}_seg.dcm"
    return [fileio.write_with(path, lambda tmp: seg.save_as(str(tmp)), suffix=".dcm")]


def _segmentation(sources: list, classes: np.ndarray, labels: dict, count: int):
    """A highdicom BINARY Segmentation of ``classes`` ``(Z, Y, X)`` (frames in the order of ``sources``)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    for source in sources:
        if "SpecificCharacterSet" in source and not source.SpecificCharacterSet:
            del source.SpecificCharacterSet  # an empty value, which highdicom refuses
    algorithm = hd.AlgorithmIdentificationSequence(
        name=SOFTWARE[0], version=SOFTWARE[1], family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=k,
            segment_label=str(labels.get(str(k), f"label_{k}"))[:64],
            segmented_property_category=codes.cid7150.Tissue,
            segmented_property_type=codes.cid7166.ConnectiveTissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for k in range(1, count + 1)
    ]
    pixels = classes.astype(np.uint8 if count < 256 else np.uint16)
    key = hashlib.sha256(
        json.dumps([[str(s.get("SOPInstanceUID", "")) for s in sources], labels, list(pixels.shape)]).encode()
        + pixels.tobytes()
    ).hexdigest()
    content_date, content_time = _source_date_time(sources[0])
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=_derived_uid("series", key),
        series_number=900,
        sop_instance_uid=_derived_uid("instance", key),
        instance_number=1,
        manufacturer=SOFTWARE[0],
        manufacturer_model_name=SOFTWARE[0],
        software_versions=SOFTWARE[1],
        device_serial_number="0",
        content_date=content_date,
        content_time=content_time,
    )
    return _deterministic(seg, key)


def _derived_uid(role: str, key: str) -> str:
    """A DICOM UID that is the same for the same ``key`` and ``role`` and, like a random one, unique otherwise."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[SOFTWARE[0], role, key])


def _source_date_time(source) -> tuple[str | None, str | None]:
    """The source's content, else series, else study date and time (``None, None`` when it has no valid date)."""
    for date_key, time_key in _DATE_SOURCES:
        date = str(source.get(date_key) or "").strip()
        if re.fullmatch(r"\d{8}", date):
            time = str(source.get(time_key) or "").strip()
            return date, time if re.fullmatch(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?", time) else "000000"
    return None, None


def _deterministic(seg, key: str):
    """Replace what highdicom draws at random or from the clock: the dimension organisation UID, and the optional
    (type 3) instance creation date and time and contribution date-time, which are left out."""
    organisation = _derived_uid("dimensions", key)
    for item in [*seg.get("DimensionOrganizationSequence", []), *seg.get("DimensionIndexSequence", [])]:
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = organisation
    for dataset, keyword in [
        (seg, "InstanceCreationDate"),
        (seg, "InstanceCreationTime"),
        *((item, "ContributionDateTime") for item in seg.get("ContributingEquipmentSequence", [])),
    ]:
        if keyword in dataset:
            delattr(dataset, keyword)
    return seg

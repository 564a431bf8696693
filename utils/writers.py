"""Write predicted masks back in the geometry (and, where it matters, the format) of the source images.

A mask arrives here as an integer ``(Z, Y, X)`` map in the *source array's* order and shape, holding the source's
own label values: the classes of :func:`utils.preprocessing.restore_label` mapped through the manifest's
``label_values`` (:func:`source_values`; e.g. class 2 → 7 for labels 1, 7, 8, 9). With it comes the case's ``writer``
record from the manifest, which says how the source was stored. Every mask gets ``masks/<id>.nii.gz`` on the source
grid; the writer of the source's kind (:data:`WRITERS`) adds a copy in the source's own format:

- ``sitk`` (NRRD, MHA): ``masks/<id>.nrrd`` (or ``.mha``) with the source's spacing, origin and direction;
- ``hdf5``: ``masks/<id>.h5`` holding the mask at the source's label key, shape and dtype;
- ``png``: ``masks/<source mask name>.png`` per slice;
- ``dicom``: ``masks/<id>_seg.dcm``, a DICOM-SEG that references the source series (needs the series' UIDs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from utils import fileio, geometry

log = logging.getLogger(__name__)
SOFTWARE = ("keras-medseg", "0.1.0")
_DATE_SOURCES = (("ContentDate", "ContentTime"), ("SeriesDate", "SeriesTime"), ("StudyDate", "StudyTime"))


def source_values(classes: np.ndarray, label_values: list[int] | None) -> np.ndarray:
    """Map contiguous classes ``0..K-1`` to the source's label values (``manifest["label_values"]``).

    Raises:
        ValueError: a class beyond ``label_values``.
    """
    classes = np.asarray(classes)
    if not label_values or list(label_values) == list(range(len(label_values))):
        return classes
    if classes.size and int(classes.max()) >= len(label_values):
        raise ValueError(f"mask holds class {int(classes.max())}, but the dataset has {len(label_values)} classes")
    return np.asarray(label_values, dtype=np.uint8 if max(label_values) < 256 else np.int16)[classes.astype(np.int64)]


def class_indices(values: np.ndarray, label_values: list[int] | None) -> np.ndarray:
    """Inverse of :func:`source_values`: source label values back to classes (unknown values raise ValueError)."""
    values = np.asarray(values)
    if not label_values or list(label_values) == list(range(len(label_values))):
        return values
    lookup = {int(v): k for k, v in enumerate(label_values)}
    unknown = sorted(set(np.unique(values).astype(int).tolist()) - set(lookup))
    if unknown:
        raise ValueError(f"mask holds values {unknown} that are not among the dataset's label values {label_values}")
    table = np.zeros(max(lookup) + 1, dtype=np.uint8 if len(lookup) < 256 else np.uint16)
    for value, index in lookup.items():
        table[value] = index
    return table[values.astype(np.int64)]


def _label_dtype(mask: np.ndarray):
    return np.uint8 if mask.size == 0 or int(mask.max()) < 256 else np.int16


def write_nifti_mask(
    mask: np.ndarray, path: str | os.PathLike, affine_zyx: np.ndarray, reference: str | os.PathLike | None = None
) -> Path:
    """Write a ``(Z, Y, X)`` label map as NIfTI with the source geometry.

    Args:
        mask: integer labels in the source array's ``(Z, Y, X)`` order.
        path: output ``.nii.gz`` path (written atomically).
        affine_zyx: the source array's affine (used when no reference file is readable).
        reference: the source NIfTI file; its header (affine, qform/sform codes, units) is reused so that the mask's
            affine equals the source's exactly.
    """
    data = np.transpose(mask, (2, 1, 0)).astype(_label_dtype(mask))
    header = None
    affine = geometry.zyx_affine_to_nifti(np.asarray(affine_zyx, dtype=float))
    if reference is not None and str(reference).endswith((".nii", ".nii.gz")) and Path(reference).is_file():
        source = nib.load(str(reference))
        if tuple(source.shape[:3]) == data.shape:
            header, affine = source.header.copy(), source.affine
    image = nib.Nifti1Image(data, affine, header=header)
    image.set_data_dtype(data.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    if header is not None:
        image.set_qform(*header.get_qform(coded=True))
        image.set_sform(*header.get_sform(coded=True))
    return fileio.write_with(path, lambda tmp: nib.save(image, str(tmp)), suffix=".nii.gz")


def write_sitk_mask(mask: np.ndarray, case: dict, output_dir: str | os.PathLike) -> list[Path]:
    """``masks/<id><ext>`` in the source's file type (NRRD, MHA) with its spacing, origin and direction.

    NIfTI sources get nothing more: ``masks/<id>.nii.gz`` is already their format.
    """
    import SimpleITK as sitk

    writer = case["writer"]
    extension = writer.get("extension", ".nrrd")
    if extension in (".nii", ".nii.gz"):
        return []
    array = mask[0] if writer.get("dimension") == 2 else mask
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    dim = image.GetDimension()
    image.SetSpacing(writer["spacing"][:dim])
    image.SetOrigin(writer["origin"][:dim])
    image.SetDirection(np.asarray(writer["direction"]).reshape(3, 3)[:dim, :dim].ravel().tolist())
    path = Path(output_dir) / "masks" / f"{case['id']}{extension}"
    return [fileio.write_with(path, lambda tmp: sitk.WriteImage(image, str(tmp), True), suffix=extension)]


def write_hdf5_mask(mask: np.ndarray, case: dict, output_dir: str | os.PathLike) -> list[Path]:
    """``masks/<id>.h5`` with the mask stored as the source stored its label: same key, shape and dtype."""
    import h5py

    writer = case["writer"]
    data = mask.reshape(writer["shape"]).astype(writer.get("dtype") or "uint8")
    path = Path(output_dir) / "masks" / f"{case['id']}.h5"

    def save(tmp: Path) -> None:
        with h5py.File(tmp, "w") as handle:
            handle.create_dataset(writer["key"], data=data, compression="gzip")

    return [fileio.write_with(path, save, suffix=".h5")]


def write_png_masks(mask: np.ndarray, case: dict, output_dir: str | os.PathLike) -> list[Path]:
    """One ``masks/<name>.png`` per slice, named like the source mask (or image) of that slice."""
    from PIL import Image

    names = case["writer"]["files"]
    if len(names) != mask.shape[0]:
        raise ValueError(f"case {case['id']}: mask has {mask.shape[0]} slices, the source {len(names)} files")
    dtype = np.uint8 if int(mask.max(initial=0)) < 256 else np.uint16
    written = []
    for name, plane in zip(names, mask, strict=True):
        image = Image.fromarray(np.ascontiguousarray(plane.astype(dtype)))
        path = Path(output_dir) / "masks" / Path(name).name
        written.append(fileio.write_with(path, lambda tmp, image=image: image.save(tmp, format="PNG"), suffix=".png"))
    return written


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


WRITERS: dict[str, Callable[..., list[Path]]] = {
    "sitk": write_sitk_mask,
    "hdf5": write_hdf5_mask,
    "png": write_png_masks,
    "dicom": write_dicom_seg,
}


def write_mask(mask: np.ndarray, case: dict, output_dir: str | os.PathLike) -> list[Path]:
    """Write ``masks/<id>.nii.gz`` (always) plus any format-specific copy for one manifest case entry.

    Args:
        mask: ``(Z, Y, X)`` source label values on the source grid (:func:`source_values` of the classes that
            :func:`utils.preprocessing.restore_label` returns).
        case: the case's manifest entry (``id``, ``geometry``, ``writer``).
        output_dir: the results folder; files go to ``masks/``.

    Returns:
        The paths written.

    Raises:
        ValueError: an unsafe case id, or a mask whose shape is not the source's.
    """
    case_id = fileio.check_case_id(case["id"])
    output_dir = Path(output_dir)
    writer = case.get("writer", {})
    expected = tuple(case.get("geometry", {}).get("source_shape", mask.shape))
    if tuple(mask.shape) != expected:
        raise ValueError(f"case {case_id}: mask shape {tuple(mask.shape)} differs from the source shape {expected}")
    written = [
        write_nifti_mask(
            mask,
            output_dir / "masks" / f"{case_id}.nii.gz",
            case["geometry"]["source_affine"],
            writer.get("reference"),
        )
    ]
    extra = WRITERS.get(writer.get("kind"))
    if extra is not None:
        written.extend(extra(mask, case, output_dir))
    return written

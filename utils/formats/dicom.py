"""DICOM: image series with their labels (a NIfTI/NRRD file, a DICOM-SEG or an RTSTRUCT), and ``masks/<id>_seg.dcm``.

- ``dicom``: every DICOM image series under a folder is a case (:func:`scan_dicom`, :func:`discover_dicom`); cases
  load with :func:`load_dicom_case` (case spec format ``dicom``): the series read with SimpleITK (HU for CT), the
  label resampled onto its grid, or read from a DICOM-SEG, or rasterised from an RTSTRUCT.
- :func:`utils.formats.dicom_seg.write_dicom_seg`: ``masks/<id>_seg.dcm``, a DICOM-SEG that references the source
  series (needs the series' UIDs).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from utils.formats.base import (
    NOT_DICOM_SUFFIXES,
    CaseData,
    CaseError,
    CaseSpec,
    DatasetSource,
    _scan_values,
    as_label_map,
    check_image,
    finalize_source,
    inside_dataset,
    safe_id,
)
from utils.formats.itk import _itk_reason, _sitk_label_reader, read_sitk, sitk_geometry, sitk_to_array

if TYPE_CHECKING:  # imported where used: reading another format never loads it
    import SimpleITK as sitk

log = logging.getLogger(__name__)

_DICOM_TAGS = tuple(  # the header elements that scanning reads
    "Modality SeriesInstanceUID StudyInstanceUID FrameOfReferenceUID PatientID ImagePositionPatient "
    "ImageOrientationPatient InstanceNumber SeriesNumber SeriesDescription Rows Columns".split()
)
_LABEL_MODALITIES = ("SEG", "RTSTRUCT")
_NON_IMAGE_MODALITIES = ("SEG", "RTSTRUCT", "SR", "PR", "KO", "RTPLAN", "RTDOSE", "REG", "DOC")


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _read_dicom_header(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_DICOM_TAGS))
    except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError, EOFError):
        return None
    except Exception as error:  # pydicom raises many more types on damaged headers (KeyError, struct.error, ...)
        log.debug("%s: unreadable DICOM header (%s)", path, error)
        return None


def _slice_layout(header) -> str:
    """Size and orientation of a slice, in words: the slices of one acquisition share them."""
    orientation = header.get("ImageOrientationPatient")
    if orientation is not None and len(orientation) == 6:
        cosines = np.asarray(orientation, float)
        plane = ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(np.cross(cosines[:3], cosines[3:]))))]
        plane += f" {(np.round(cosines, 2) + 0.0).tolist()}"  # + 0.0 turns -0.0 into 0.0
    else:
        plane = "no orientation"
    return f"{header.get('Rows', '?')}x{header.get('Columns', '?')} {plane}"


def _damaged_dicom(path: Path, header) -> bool:
    """A file that starts like DICOM but whose data set (read without error) lacks the Modality that every image
    has: its content is garbage after the preamble. A DICOMDIR (media storage directory) has no Modality either."""
    media_class = str(getattr(header, "file_meta", {}).get("MediaStorageSOPClassUID", ""))
    return _looks_like_dicom(path) and media_class != "1.2.840.10008.1.3.10"


def _slice_position(header) -> float | None:
    position, orientation = header.get("ImagePositionPatient"), header.get("ImageOrientationPatient")
    if position is None or orientation is None:
        return None
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    return float(np.dot(normal, np.asarray(position, float)))


def scan_dicom(root: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """Group the DICOM files under ``root`` into image series and label objects (SEG, RTSTRUCT).

    Returns:
        ``(series, label_objects)``: each series ``{"uid", "files" (sorted by position along the slice normal),
        "folder", "modality", "patient", "frame", "number", "description"}``, plus ``"unreadable"`` when its folder
        holds files that cannot be parsed as DICOM (those starting with the DICOM preamble are damaged slices) and
        ``"error"`` when it holds a file that leads out of ``root`` (a symbolic link; never opened, and a folder of
        only such files is a series of its own that fails); each label object ``{"path", "modality", "frame",
        "series_uid", "names"}`` where ``series_uid`` is the series it refers to, if it says, plus ``"error"`` when
        it cannot be read.
    """
    root = Path(root)
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    groups: dict[str, dict] = {}
    label_objects = []
    unreadable: dict[str, list[str]] = {}
    escaping: dict[str, str] = {}
    for path in paths:
        if path.name.lower().endswith(NOT_DICOM_SUFFIXES) or path.name.startswith("."):
            continue
        try:
            inside_dataset(path, root if root.is_dir() else path)
        except CaseError as error:
            escaping.setdefault(str(path.parent), str(error))
            continue
        header = _read_dicom_header(path)
        try:
            slice_info = _scan_header(path, header)
        except Exception as error:  # header values a damaged file holds (wrong counts, text for numbers)
            log.debug("%s: unreadable DICOM header (%s)", path, error)
            slice_info = "unreadable"
        if slice_info == "unreadable":
            unreadable.setdefault(str(path.parent), []).append(str(path.resolve()))
        elif slice_info in _LABEL_MODALITIES:
            label_objects.append(_label_object(path, slice_info))
        elif slice_info is not None:
            info, order, layout = slice_info
            group = groups.setdefault(info["uid"], {**info, "files": [], "layouts": {}})
            group["files"].append((order, str(path.resolve())))
            group["layouts"].setdefault(layout, []).append(path.name)
    series = []
    for group in groups.values():
        group["files"] = [f for _, f in sorted(group["files"])]
        layouts = group.pop("layouts")
        if len(layouts) > 1:
            group["mixed"] = "; ".join(f"{len(v)} x {k} (e.g. {v[0]})" for k, v in layouts.items())
        if group["folder"] in unreadable:
            group["unreadable"] = unreadable[group["folder"]]
        if group["folder"] in escaping:
            group["error"] = escaping.pop(group["folder"])
        series.append(group)
    for folder, error in escaping.items():  # folders with no series but a file that leads out of the dataset
        series.append({**_series_info(None, Path(folder) / "_"), "files": [], "error": error})
    return sorted(series, key=lambda s: (s["folder"], s["number"], s["uid"])), label_objects


def _scan_header(path: Path, header) -> tuple[dict, float, str] | str | None:
    """What scanning keeps of one file: ``(series info, order along the slice normal, slice layout)`` for an image
    slice, ``"SEG"`` or ``"RTSTRUCT"`` for a label object, ``"unreadable"`` for a damaged file, ``None`` for
    anything else (other DICOM objects, a DICOMDIR)."""
    if header is None or ("Modality" not in header and _damaged_dicom(path, header)):
        return "unreadable"
    if "Modality" not in header:
        return None
    modality = str(header.Modality).upper()
    if modality in _LABEL_MODALITIES:
        return modality
    if modality in _NON_IMAGE_MODALITIES:
        return None
    position = _slice_position(header)
    order = position if position is not None else float(header.get("InstanceNumber") or 0)
    return _series_info(header, path), order, _slice_layout(header)


def _series_info(header, path: Path) -> dict:
    """The series facts of a slice's header (``header`` ``None``: a folder's placeholder, named by the folder)."""
    get = header.get if header is not None else (lambda key: None)
    return {
        "uid": str(get("SeriesInstanceUID") or "") or f"folder:{path.parent}",
        "folder": str(path.parent),
        "modality": str(header.Modality).upper() if header is not None else "OT",
        "patient": str(get("PatientID") or ""),
        "frame": str(get("FrameOfReferenceUID") or ""),
        "number": str(get("SeriesNumber") or ""),
        "description": str(get("SeriesDescription") or ""),
    }


def _label_object(path: Path, modality: str) -> dict:
    """A SEG or RTSTRUCT's facts; one that cannot be read gets an ``error`` (the case it labels fails with it)."""
    try:
        return _read_label_object(path, modality)
    except Exception as error:  # pydicom raises many types for damaged files
        message = f"{path}: cannot read the DICOM {modality} ({type(error).__name__}: {error})"
        return {"path": str(path.resolve()), "modality": modality, "frame": "", "series_uid": None, "names": {},
                "error": " ".join(message.split())}  # fmt: skip


def _read_label_object(path: Path, modality: str) -> dict:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    referenced = None
    if modality == "SEG" and "ReferencedSeriesSequence" in ds:
        referenced = str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
    if modality == "RTSTRUCT":
        for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
            for study in frame.get("RTReferencedStudySequence", []):
                for series in study.get("RTReferencedSeriesSequence", []):
                    referenced = str(series.SeriesInstanceUID)
    if modality == "SEG":
        names = {
            int(s.SegmentNumber): str(s.get("SegmentLabel", f"segment_{s.SegmentNumber}")) for s in ds.SegmentSequence
        }
    else:
        names = {int(r.ROINumber): str(r.ROIName) for r in ds.get("StructureSetROISequence", [])}
    frame = str(ds.get("FrameOfReferenceUID") or "")
    if not frame and modality == "RTSTRUCT" and ds.get("ReferencedFrameOfReferenceSequence"):
        frame = str(ds.ReferencedFrameOfReferenceSequence[0].get("FrameOfReferenceUID") or "")
    return {"path": str(path.resolve()), "modality": modality, "frame": frame, "series_uid": referenced, "names": names}


def _match_label_object(series: dict, objects: list[dict], single: bool) -> dict | None:
    for rule in ("series_uid", "frame"):
        key = "uid" if rule == "series_uid" else "frame"
        matches = [o for o in objects if o.get(rule) and o.get(rule) == series[key]]
        if matches:
            if len(matches) > 1:
                log.warning("%s: %d label objects refer to it; using %s", series["folder"], len(matches), matches[0])
            return matches[0]
    return objects[0] if single and len(objects) == 1 else None


def discover_dicom(path: str | os.PathLike, options: dict | None = None) -> DatasetSource:
    """Every DICOM image series under a folder becomes a case.

    Labels: ``label`` (a NIfTI/NRRD/MHA file in the same physical space, a DICOM-SEG or an RTSTRUCT file) for a
    single series, or the SEG/RTSTRUCT objects found beside the series (matched by referenced series, then frame of
    reference). Label files are resampled onto the series grid with nearest neighbour, whatever their axis order.
    RTSTRUCT ROIs become classes in order of first appearance (later ROIs win where contours overlap).

    Raises:
        FileNotFoundError: ``path`` or ``label`` does not exist.
        ValueError: no image series, or ``label`` given with several series.
    """
    options = options or {}
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: input not found")
    series, objects = scan_dicom(root)
    if not series:
        raise ValueError(f"{root}: no DICOM image series found")
    label_option = options.get("label")
    if label_option:
        label_path = Path(label_option)
        if not label_path.is_file():
            raise FileNotFoundError(f"{label_path}: label file not found")
        if len(series) > 1:
            raise ValueError(
                f"{root}: holds {len(series)} series; --label fits one series only (put DICOM-SEG or RTSTRUCT "
                "objects beside the series instead, or point --input at one series folder)"
            )
        header = _read_dicom_header(label_path)
        if header is not None and str(header.get("Modality", "")).upper() in _LABEL_MODALITIES:
            objects = [_label_object(label_path, str(header.Modality).upper())]
        else:
            objects = [{"path": str(label_path.resolve()), "modality": "FILE", "names": {}}]
    cases, values, names, roi_values = [], set(), {}, {}
    used_ids = set()
    for item in series:
        found = _match_label_object(item, objects, single=len(series) == 1)
        spec = _dicom_spec(root, item, found, used_ids, len(series) == 1)
        if found is not None and found["modality"] == "FILE":
            values |= _scan_values([(found["path"], _sitk_label_reader(found["path"]))])
        elif found is not None and found["modality"] == "SEG":
            values |= set(found["names"])
            names.update(found["names"])
        elif found is not None:
            spec.rtstruct_rois = {}
            for name in found["names"].values():
                value = roi_values.setdefault(name, len(roi_values) + 1)
                spec.rtstruct_rois[name] = value
                names[value] = name
            values |= set(spec.rtstruct_rois.values())
        cases.append(spec)
    modalities = [s["modality"] for s in series]
    channels = {"0": max(set(modalities), key=modalities.count)}
    source = finalize_source(
        root.name if root.is_dir() else root.parent.name, "dicom", channels, cases, root, values, names, options
    )
    for spec in source.cases:
        spec.label_names = source.labels
    return source


def _dicom_spec(root: Path, series: dict, label: dict | None, used_ids: set, single: bool) -> CaseSpec:
    folder = Path(series["folder"])
    base = root.name if single and root.is_dir() else (str(folder.relative_to(root)) if root.is_dir() else folder.name)
    if base in ("", "."):
        base = root.name
    case_id = safe_id(base)
    if case_id in used_ids:
        case_id = safe_id(f"{base}_{series['number'] or len(used_ids)}")
    while case_id in used_ids:
        case_id = safe_id(f"{case_id}_{len(used_ids)}")
    used_ids.add(case_id)
    return CaseSpec(
        id=case_id,
        patient=safe_id(series["patient"]) if series["patient"] else case_id,
        format="dicom",
        image=series["files"],
        label=label["path"] if label else None,
        label_kind=label["modality"].lower() if label else None,
        modality=series["modality"],
        series_uid=series["uid"],
        frame_of_reference=series["frame"],
        unreadable=series.get("unreadable") or None,
        mixed=series.get("mixed") or None,
        error=series.get("error") or (label or {}).get("error"),
    )


def read_dicom_series(files: Sequence[str], where: str, unreadable: Sequence[str] = ()) -> sitk.Image:
    """Read a sorted list of DICOM slices with SimpleITK (rescale slope/intercept applied: CT in HU).

    Args:
        files: the slices, sorted along the slice normal.
        where: the series' folder, for messages.
        unreadable: files beside the series that could not be parsed as DICOM. Any that starts with the DICOM
            preamble is a damaged slice, and the series is refused rather than read with a slice missing; the others
            are named when the slices turn out unevenly spaced.

    Raises:
        CaseError: a damaged or unreadable slice (named), or slices unevenly spaced or repeated.
    """
    import SimpleITK as sitk

    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise CaseError(f"{where}: DICOM file {missing[0]} not found")
    damaged = [f for f in unreadable if _looks_like_dicom(Path(f))]
    if damaged:
        raise CaseError(f"{damaged[0]}: damaged DICOM file among the slices in {where} ({_dicom_problem(damaged[0])})")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    reader.MetaDataDictionaryArrayUpdateOn()
    warnings_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's own warning on uneven slices; the check below names it
    try:
        image = reader.Execute()
    except RuntimeError as error:
        culprit = _unreadable_slice(files)
        if culprit is not None:
            raise CaseError(
                f"{culprit}: damaged DICOM slice of the series in {where} ({_dicom_problem(culprit)})"
            ) from error
        raise CaseError(f"{where}: cannot read the DICOM series ({_itk_reason(error)})") from error
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_shown)
    if len(files) > 2:
        direction = np.asarray(image.GetDirection()).reshape(3, 3)
        positions = []
        for i in range(len(files)):
            if reader.HasMetaDataKey(i, "0020|0032"):
                point = [float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")]
                positions.append(float(np.dot(direction[:, 2], point)))
        steps = np.diff(positions)
        if (
            len(positions) == len(files)
            and steps.size
            and (np.any(np.abs(steps) < 1e-4) or np.ptp(steps) > 0.01 * max(abs(float(np.median(steps))), 1e-3))
        ):
            others = f"; the folder also holds files that are not readable DICOM: {', '.join(unreadable)}"
            raise CaseError(
                f"{where}: slices are repeated or unevenly spaced (steps {np.round(np.unique(np.round(steps, 3)), 3)} "
                f"mm); the series may miss slices or mix acquisitions{others if unreadable else ''}"
            )
    return image


def _unreadable_slice(files: Sequence[str]) -> str | None:
    """The first file of a series that SimpleITK cannot read on its own (after the series failed to read)."""
    import SimpleITK as sitk

    for file in files:
        try:
            sitk.ReadImage(file)
        except RuntimeError:
            return file
    return None


def _dicom_problem(path: str) -> str:
    """What is wrong with a damaged DICOM file, in a few words."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the very damage reported here
            if "Modality" not in pydicom.dcmread(path, stop_before_pixels=True):
                return "its content after the DICOM preamble is not a readable data set"
            dataset = pydicom.dcmread(path)
            if not any(k in dataset for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
                return "its pixel data is missing or cut short: the file is truncated"
            dataset.pixel_array  # noqa: B018  (decoding is the check)
    except Exception as error:  # pydicom raises many types for damaged files
        lines = str(error).strip().splitlines()
        return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return "its pixel data cannot be decoded"


def resample_label_onto(label: sitk.Image, reference: sitk.Image, path: str | os.PathLike) -> np.ndarray:
    """Nearest-neighbour resampling of a label image onto ``reference``'s grid (any axis order or flips).

    Raises:
        CaseError: the label is not a scalar image or does not overlap the reference in physical space.
    """
    import SimpleITK as sitk

    if label.GetNumberOfComponentsPerPixel() != 1 or label.GetDimension() != 3:
        raise CaseError(f"{path}: a label must be a scalar 3D image")
    if not _overlaps(label, reference):
        raise CaseError(f"{path}: the label does not overlap the image in physical space (another frame of reference?)")
    resampled = sitk.Resample(label, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())
    return sitk.GetArrayFromImage(resampled)


def _corners(image: sitk.Image) -> np.ndarray:
    size = image.GetSize()
    points = [[i, j, k] for i in (-0.5, size[0] - 0.5) for j in (-0.5, size[1] - 0.5) for k in (-0.5, size[2] - 0.5)]
    return np.array([image.TransformContinuousIndexToPhysicalPoint(p) for p in points])


def _overlaps(first: sitk.Image, second: sitk.Image) -> bool:
    a, b = _corners(first), _corners(second)
    return bool(np.all(a.min(0) < b.max(0)) and np.all(b.min(0) < a.max(0)))


def _read_dicom_seg(path: str, reference: sitk.Image, frame: str) -> np.ndarray:
    import highdicom as hd
    import SimpleITK as sitk

    try:
        seg = hd.seg.segread(path)
        volume = seg.get_volume(combine_segments=True)
    except Exception as error:  # highdicom raises ValueError, RuntimeError, KeyError on unusual objects
        raise CaseError(f"{path}: cannot read the DICOM-SEG ({type(error).__name__}: {error})") from error
    seg_frame = str(seg.get("FrameOfReferenceUID") or "")
    if frame and seg_frame and frame != seg_frame:
        raise CaseError(f"{path}: the DICOM-SEG's frame of reference {seg_frame} is not the series' {frame}")
    array = np.ascontiguousarray(volume.array)
    image = sitk.GetImageFromArray(array.astype(np.int16 if array.max(initial=0) > 255 else np.uint8))
    affine = np.asarray(volume.affine, dtype=float)  # (slice, row, column) index -> LPS mm
    # SimpleITK's x, y, z index = (column, row, slice): reverse the columns of the affine.
    matrix = affine[:3, 2::-1]
    spacing = np.linalg.norm(matrix, axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((matrix / spacing).ravel().tolist())
    image.SetOrigin(affine[:3, 3].tolist())
    return resample_label_onto(image, reference, path)


def rasterize_rtstruct(path: str | os.PathLike, reference: sitk.Image, roi_values: dict[str, int]) -> np.ndarray:
    """Fill the closed planar contours of an RTSTRUCT on ``reference``'s grid, ``(Z, Y, X)``.

    Each ROI named in ``roi_values`` gets its value (later ROIs overwrite earlier ones where they overlap); nested
    contours on one slice toggle (holes). Contour points are mapped to continuous voxel indices; a pixel belongs to a
    contour when its centre lies inside it.

    Raises:
        CaseError: unreadable file or contours that lie off the series.
    """
    import pydicom
    from skimage.draw import polygon

    try:
        ds = pydicom.dcmread(str(path))
    except Exception as error:
        raise CaseError(f"{path}: cannot read the RTSTRUCT ({type(error).__name__}: {error})") from error
    size = reference.GetSize()
    shape = (size[2], size[1], size[0])
    matrix = np.asarray(reference.GetDirection()).reshape(3, 3) @ np.diag(reference.GetSpacing())
    inverse, origin = np.linalg.inv(matrix), np.asarray(reference.GetOrigin())
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.get("StructureSetROISequence", [])}
    label = np.zeros(shape, dtype=np.uint8 if max(roi_values.values(), default=0) < 256 else np.int16)
    off_grid = 0
    for roi in ds.get("ROIContourSequence", []):
        value = roi_values.get(names.get(int(roi.ReferencedROINumber), ""))
        if value is None:
            continue
        mask = np.zeros(shape, dtype=bool)
        for contour in roi.get("ContourSequence", []):
            if str(contour.get("ContourGeometricType", "CLOSED_PLANAR")) != "CLOSED_PLANAR":
                continue
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            index = (inverse @ (points - origin).T).T  # continuous (x, y, z) index
            z = int(np.rint(np.median(index[:, 2])))
            if not 0 <= z < shape[0]:
                off_grid += 1
                continue
            rows, cols = polygon(index[:, 1], index[:, 0], shape=shape[1:])
            plane = np.zeros(shape[1:], dtype=bool)
            plane[rows, cols] = True
            mask[z] ^= plane
        label[mask] = value
    if off_grid:
        log.warning("%s: %d contour(s) lie outside the series and were skipped", path, off_grid)
    return label


def load_dicom_case(spec: CaseSpec) -> CaseData:
    """Load a DICOM series (HU for CT) and its label resampled onto the series grid."""
    where = str(Path(spec.image[0]).parent)
    if spec.mixed:
        raise CaseError(
            f"{where}: series {spec.series_uid} mixes slices of different sizes or orientations "
            f"({spec.mixed}): more than one acquisition under one series UID; separate them into folders "
            "with their own series"
        )
    image = read_dicom_series(spec.image, where, spec.unreadable or ())
    if spec.unreadable:
        log.warning("%s: left out file(s) that are not readable DICOM: %s", where, ", ".join(spec.unreadable))
    array, affine = sitk_to_array(image, where)
    label = None
    if spec.label:
        kind = spec.label_kind or "file"
        if kind == "seg":
            raw = _read_dicom_seg(spec.label, image, spec.frame_of_reference or "")
        elif kind == "rtstruct":
            raw = rasterize_rtstruct(spec.label, image, spec.rtstruct_rois or {})
        else:
            raw = resample_label_onto(read_sitk(spec.label), image, spec.label)
        label = as_label_map(raw, spec.label)
    writer = {"kind": "dicom", "files": list(spec.image), "labels": spec.label_names or {}, **sitk_geometry(image)}
    return CaseData(spec.id, check_image(array, where), label, affine, writer)

"""Formats: every input format becomes the same thing, a list of case specs and, per case, a :class:`CaseData`; a
predicted mask goes back in the geometry, and where it matters the format, of the source.

Reading happens in two steps so that work can be spread over processes and recorded in JSON:

1. ``discover(path, fmt, options)`` looks at the input and returns a :class:`DatasetSource`: the dataset's name,
   labels, channel names and one :class:`CaseSpec` per case: ``id``, ``patient``, ``format``, ``image`` (paths),
   ``label`` (a path or ``None``) and what its format needs to read it, stored in manifests as plain JSON
   (:meth:`CaseSpec.to_json`, :meth:`CaseSpec.from_json`).
2. ``load_case(spec)`` reads one case and returns a :class:`CaseData`: the image ``(Z, Y, X, C)`` float32, the label
   ``(Z, Y, X)`` integer map or ``None``, the affine of the arrays (see :mod:`utils.geometry`) and the information the
   writer needs to put a mask back in the source file's own format.

Formats (:data:`FORMATS`, keyed by layout, each auto-detected by :func:`detect_format`), one module each:

- ``msd``: Medical Segmentation Decathlon folder (``dataset.json``, ``imagesTr``, ``labelsTr``), NIfTI, 4D = channels
  (:mod:`utils.formats.nifti`).
- ``files``: image/label file pairs in NRRD, MHA/MHD or NIfTI matched by ``image_pattern``/``label_pattern``
  (:mod:`utils.formats.itk`).
- ``hdf5``: the Kaggle soft-tissue-sarcoma layout (groups ``ct_data``, ``pet_data``, ``label_data`` holding one
  dataset per patient) or any layout named by ``hdf5_image_keys``/``hdf5_label_key``, stacked samples included
  (:mod:`utils.formats.hdf5`).
- ``brats``: BraTS case folders (``<case>_flair|t1|t1ce|t2.nii.gz`` + ``<case>_seg.nii.gz``; BraTS 2023 names too)
  (:mod:`utils.formats.nifti`).
- ``dicom``: DICOM series under a folder, labels from a NIfTI/NRRD file, a DICOM-SEG or an RTSTRUCT
  (:mod:`utils.formats.dicom`).
- ``png``: 2D image and mask folders (PNG/JPG/TIFF) matched by file name, grouped into patients by a pattern
  (:mod:`utils.formats.png`).
- ``nnunet``: nnU-Net v2 raw dataset (``dataset.json`` with ``channel_names``, ``labels``, ``file_ending`` and no
  case list; ``imagesTr/<case>_XXXX``, ``labelsTr/<case>``, ``imagesTs/``) (:mod:`utils.formats.nnunet`).
- ``folders``: plain folders matched by case name with no pattern: ``imagesTr``/``labelsTr``, ``images``/``labels``
  or a ``label`` folder, pairs side by side (``case1`` + ``case1_seg``), or images alone (new scans); channels in
  ``_0000``-style files (:mod:`utils.formats.folders`, :mod:`utils.formats.channels`).

A case spec's ``format`` is not the layout but the *kind* that loads it (:attr:`Format.kind`: ``nifti`` for ``msd``
and ``brats``, ``sitk`` for ``files`` and ``folders``, ``nifti`` or ``sitk`` for ``nnunet`` by its ``file_ending``,
else the layout's name); the mask writer record of a case has the same
``kind``. Both are stored in manifests; :func:`format_of_kind` finds the :class:`Format` of one.

Labels are remapped to contiguous classes ``0..K-1`` (after the user's ``label_map`` and ``binarize``); the value each
class had in the source is kept in ``label_values`` so that writers put the source values back.

Everything after the readers is format-blind.

Writing (:func:`write_mask`): a mask arrives as an integer ``(Z, Y, X)`` map in the *source array's* order and shape,
holding the source's own label values: the classes of :func:`utils.preprocessing.restore_label` mapped through the
manifest's ``label_values`` (:func:`source_values`; e.g. class 2 → 7 for labels 1, 7, 8, 9). With it come the case's
:class:`~utils.geometry.GeometryRecord` and its ``writer`` record from the manifest, which says how the source was
stored. Every mask gets ``masks/<id>.nii.gz`` on
the source grid; the writer of the source's kind (:attr:`Format.write`) adds a copy in the source's own format:

- ``sitk`` (NRRD, MHA): ``masks/<id>.nrrd`` (or ``.mha``) with the source's spacing, origin and direction;
- ``hdf5``: ``masks/<id>.h5`` holding the mask at the source's label key, shape and dtype;
- ``png``: ``masks/<source mask name>.png`` per slice;
- ``dicom``: ``masks/<id>_seg.dcm``, a DICOM-SEG that references the source series (needs the series' UIDs).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils import fileio
from utils.formats.base import (
    HDF5_SUFFIXES,
    PNG_SUFFIXES,
    SITK_SUFFIXES,
    CaseData,
    CaseError,
    CaseSpec,
    DatasetSource,
    Hdf5Keys,
    _pattern_regex,
    apply_label_lookup,
    check_label_values,
    class_indices,
    source_values,
)
from utils.formats.dicom import _looks_like_dicom, discover_dicom, load_dicom_case
from utils.formats.dicom_seg import write_dicom_seg
from utils.formats.folders import discover_folders
from utils.formats.hdf5 import discover_hdf5, load_hdf5_case, write_hdf5_mask
from utils.formats.itk import discover_files, load_sitk_case, write_sitk_mask
from utils.formats.nifti import _brats_files, discover_brats, discover_msd, load_nifti_case, write_nifti_mask
from utils.formats.nnunet import discover_nnunet, is_nnunet_v2
from utils.formats.png import discover_png, load_png_case, write_png_masks
from utils.geometry import GeometryRecord

__all__ = [
    "FORMATS",
    "LAYOUTS",
    "CaseData",
    "CaseError",
    "CaseSpec",
    "DatasetSource",
    "Format",
    "Hdf5Keys",
    "class_indices",
    "detect_format",
    "discover",
    "format_of_kind",
    "load_case",
    "source_values",
    "write_mask",
]


@dataclass(frozen=True)
class Format:
    """One input layout: how its cases are found, loaded, and their masks written back in the source's format.

    Attributes:
        name: the layout, a ``--format`` choice and the ``format`` of the :class:`DatasetSource` found.
        kind: the case spec's ``format`` and the mask writer record's ``kind``, as manifests store them (``nifti``,
            ``sitk``, ``hdf5``, ``dicom``, ``png``); layouts read by the same loader share it (``msd``, ``brats``).
        discover: ``discover(path, options) -> DatasetSource``.
        load: ``load(spec: CaseSpec) -> CaseData``.
        write: ``write(mask, case, output_dir) -> [paths]``, the copy in the source's own format beside
            ``masks/<id>.nii.gz``; ``None`` where that file is the source's format already (NIfTI).
    """

    name: str
    kind: str
    discover: Callable[..., DatasetSource]
    load: Callable[..., CaseData]
    write: Callable[..., list[Path]] | None = None


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("msd", "nifti", discover_msd, load_nifti_case),
        Format("files", "sitk", discover_files, load_sitk_case, write_sitk_mask),
        Format("hdf5", "hdf5", discover_hdf5, load_hdf5_case, write_hdf5_mask),
        Format("brats", "nifti", discover_brats, load_nifti_case),
        Format("dicom", "dicom", discover_dicom, load_dicom_case, write_dicom_seg),
        Format("png", "png", discover_png, load_png_case, write_png_masks),
        Format("nnunet", "nifti", discover_nnunet, load_nifti_case),
        Format("folders", "sitk", discover_folders, load_sitk_case, write_sitk_mask),
    )
}
LAYOUTS = tuple(sorted(FORMATS))
_DEFAULT_IMAGE = _pattern_regex("*_image.*")


def format_of_kind(kind: str | None) -> Format | None:
    """The :class:`Format` whose loader and writer serve ``kind`` (a case spec's ``format``, a writer record's
    ``kind``), or ``None`` for an unknown kind. Layouts of one kind share loader and writer; the first is returned."""
    return next((f for f in FORMATS.values() if f.kind == kind), None)


def detect_format(path: str | os.PathLike) -> str:
    """Guess the input format of ``path``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: no known layout matches.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: input not found")
    if path.is_file():
        name = path.name.lower()
        if name.endswith(HDF5_SUFFIXES):
            return "hdf5"
        if name.endswith(SITK_SUFFIXES):
            return "files"
        if name.endswith(".dcm") or _looks_like_dicom(path):
            return "dicom"
        raise ValueError(f"{path}: cannot tell the input format; pass --format ({', '.join(sorted(FORMATS))})")
    if (path / "dataset.json").is_file():
        try:
            return "nnunet" if is_nnunet_v2(fileio.read_json(path / "dataset.json")) else "msd"
        except (ValueError, OSError):  # msd discovery names the problem
            return "msd"
    subdirs = [p for p in path.iterdir() if p.is_dir()]
    if any(_brats_files(d) for d in subdirs[:20]):
        return "brats"
    files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
    names = [p.name.lower() for p in files]
    if any(n.endswith(HDF5_SUFFIXES) for n in names):
        return "hdf5"
    if any(n.endswith(".dcm") for n in names) or any(_looks_like_dicom(p) for p in files[:50]):
        return "dicom"
    if any(n.endswith(SITK_SUFFIXES) for n in names):  # files: the default '*_image.*' pairs; folders: no pattern
        return "files" if any(n.endswith(SITK_SUFFIXES) and _DEFAULT_IMAGE.match(n) for n in names) else "folders"
    if any(n.endswith(PNG_SUFFIXES) for n in names):
        return "png"
    raise ValueError(f"{path}: cannot tell the input format; pass --format ({', '.join(sorted(FORMATS))})")


def discover(path: str | os.PathLike, fmt: str = "auto", options: dict | None = None) -> DatasetSource:
    """Find the cases under ``path`` in format ``fmt`` (``auto`` detects it).

    Args:
        path: the input folder or file.
        fmt: a key of :data:`FORMATS` (a layout, :data:`LAYOUTS`) or ``auto``.
        options: reader options: ``label``, ``image_pattern``, ``label_pattern``, ``channel_patterns``,
            ``num_channels`` (the channels a case must have, e.g. a run's), ``patient_pattern``,
            ``hdf5_image_keys``, ``hdf5_label_key``, ``source_spacing`` (HDF5, PNG), ``label_map`` ``{source: target}``,
            ``binarize``, ``label_names`` ``{source value: name}``.

    Raises:
        FileNotFoundError: the input (or a file it names) is missing.
        ValueError: unknown format or a layout problem, naming the file.
    """
    options = options or {}
    if fmt == "auto":
        fmt = detect_format(path)
        patterns = options.get("image_pattern") or options.get("channel_patterns")
        if fmt == "folders" and patterns:
            fmt = "files"
        elif fmt == "files" and not patterns and options.get("label") and Path(options["label"]).is_dir():
            fmt = "folders"  # a label folder pairs by case name
    if fmt not in FORMATS:
        raise ValueError(f"unknown input format {fmt!r}; known: auto, {', '.join(sorted(FORMATS))}")
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: input not found")
    return FORMATS[fmt].discover(path, options)


def load_case(spec: CaseSpec | dict, allowed_labels: set[int] | None = None, *, integers: bool = False) -> CaseData:
    """Read one case described by a spec from :func:`discover`; the label comes back as contiguous classes.

    Args:
        spec: the case's :class:`CaseSpec`, or its JSON object (:meth:`CaseSpec.to_json`, e.g. from a manifest).
        allowed_labels: the classes the label may hold; ``None`` checks nothing.
        integers: keep an image stored as integers (CT in HU: int16) in its own dtype instead of float32, half the
            memory; :func:`utils.preprocessing.prepare_case` turns it into the same float32 values as it resamples.

    Raises:
        CaseError: the case cannot be read, or its label holds values outside ``allowed_labels``.
        ValueError: no reader for the spec's format, or a JSON object that is not a case spec.
    """
    if not isinstance(spec, CaseSpec):
        spec = CaseSpec.from_json(spec)
    if spec.error:
        raise CaseError(spec.error)
    fmt = format_of_kind(spec.format)
    if fmt is None:
        raise ValueError(f"case {spec.id!r}: no reader for format {spec.format!r}")
    case = fmt.load(spec)
    if not integers:
        case.image = case.image.astype(np.float32, copy=False)
    if case.label is not None:
        where = spec.label or spec.image[0]
        if spec.label_lookup:
            case.label = apply_label_lookup(case.label, spec.label_lookup, where)
        if allowed_labels is not None:
            check_label_values(case.label, allowed_labels, where)
    if spec.label_values:
        case.writer["label_values"] = list(spec.label_values)
    return case


def write_mask(mask: np.ndarray, case: dict, output_dir: str | os.PathLike) -> list[Path]:
    """Write ``masks/<id>.nii.gz`` (always) plus any format-specific copy for one manifest case entry.

    Args:
        mask: ``(Z, Y, X)`` source label values on the source grid (:func:`source_values` of the classes that
            :func:`utils.preprocessing.restore_label` returns).
        case: the case's manifest entry: ``id``, ``geometry`` (a :class:`~utils.geometry.GeometryRecord`, or its
            JSON object) and ``writer``.
        output_dir: the results folder; files go to ``masks/``.

    Returns:
        The paths written.

    Raises:
        ValueError: an unsafe case id, a geometry that is not a geometry record, or a mask whose shape is not the
            source's.
    """
    case_id = fileio.check_case_id(case["id"])
    output_dir = Path(output_dir)
    writer = case.get("writer", {})
    geometry = case["geometry"]
    if not isinstance(geometry, GeometryRecord):
        geometry = GeometryRecord.from_json(geometry, f"case {case_id}: geometry")
    if tuple(mask.shape) != tuple(geometry.source_shape):
        expected = tuple(geometry.source_shape)
        raise ValueError(f"case {case_id}: mask shape {tuple(mask.shape)} differs from the source shape {expected}")
    written = [
        write_nifti_mask(
            mask, output_dir / "masks" / f"{case_id}.nii.gz", geometry.source_affine, writer.get("reference")
        )
    ]
    fmt = format_of_kind(writer.get("kind"))
    if fmt is not None and fmt.write is not None:
        written.extend(fmt.write(mask, case, output_dir))
    return written

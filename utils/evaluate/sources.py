"""A prepared case's source image and truth for scoring: from its raw files, or, when they are gone, rebuilt from the
prepared volumes.

``evaluation.py --data`` scores on the source grid, so it reads each case's raw files again (the manifest stores them
relative to the input root: :mod:`utils.prepared`; ``--source-root DIR`` says where they moved). When a case's files
are not there, its truth is the prepared label put back on the source grid by :func:`utils.preprocessing.restore_label`
(nearest-neighbour, the exact inverse of reorientation and cropping; where the dataset was resampled, the label's
boundary moves by up to half a prepared voxel) and its picture is drawn from the prepared image put back the same way
(normalised intensities). :func:`missing_note` says so in one line; each such case's record says ``"truth":
"prepared"``. The writer of a DICOM source needs the series to reference, so such a case gets ``masks/<id>.nii.gz``
alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from utils import geometry
from utils.formats import CaseData, load_case
from utils.geometry import GeometryRecord
from utils.prepared import PreparedDataset
from utils.preprocessing import restore_label

log = logging.getLogger(__name__)
NEEDS_SOURCE_FILES = ("dicom",)  # mask writers that read the source files (a DICOM-SEG references its series)


def read_source(dataset: PreparedDataset, case_id: str) -> tuple[CaseData, bool]:
    """The case as read from its source files, or rebuilt from its prepared volumes when they are missing.

    Returns:
        ``(case, rebuilt)``: ``case.image`` ``(Z, Y, X, C)`` (integers as stored, e.g. int16 HU, else float32) and
        ``case.label`` (classes, ``None`` when unlabelled) on the source grid; ``rebuilt`` is ``True`` when they came
        from the prepared volumes.

    Raises:
        CaseError: the source files are there but cannot be read (the reader's message names the file).
    """
    if not dataset.missing_sources(case_id):
        return load_case(dataset.spec(case_id), integers=True), False  # a CT stays int16: half the memory
    return from_prepared(dataset, case_id), True


def from_prepared(dataset: PreparedDataset, case_id: str) -> CaseData:
    """The case's prepared image and label put back on its source grid, with its writer record."""
    record = dataset.geometry(case_id)
    label = dataset.label(case_id)
    writer = dataset.writer(case_id)
    if writer.get("kind") in NEEDS_SOURCE_FILES:
        writer = {k: v for k, v in writer.items() if k != "kind"}
    return CaseData(
        case_id,
        restore_image(np.asarray(dataset.image(case_id)), record),
        None if label is None else restore_label(np.asarray(label), record),
        np.asarray(record.source_affine, dtype=float),
        writer,
    )


def restore_image(image: np.ndarray, record: GeometryRecord) -> np.ndarray:
    """A prepared image ``(Z, Y, X, C)`` back on the source grid: resampled linearly to the cropped source shape,
    placed in the oriented volume (the rest filled with the image's minimum) and reoriented to the source's axes."""
    resized = geometry.resize_volume(image, record.cropped_shape, 1)
    fill = float(image.min()) if image.size else 0.0
    placed = geometry.uncrop(np.asarray(resized, dtype=np.float32), record.crop_box, record.oriented_shape, fill)
    return geometry.undo_reorient(placed, record.source_axcodes)


def missing_note(dataset: PreparedDataset, case_ids: Sequence[str]) -> str | None:
    """One line when some cases' source files are missing (their truth will be the prepared labels), else ``None``."""
    missing = {case_id: dataset.missing_sources(case_id) for case_id in case_ids}
    missing = {case_id: files for case_id, files in missing.items() if files}
    if not missing:
        return None
    first = next(iter(missing.values()))[0]
    return (
        f"{dataset.path / 'manifest.json'}: the source files of {len(missing)} of {len(case_ids)} case(s) are not "
        f"under {dataset.source_root} (e.g. {first}); they are scored against the prepared labels put back on the "
        "source grid and drawn from the prepared images (pass --source-root DIR where the raw files are now)"
    )

"""Class probabilities saved beside the masks (``evaluation.py --save-probabilities``), as nnU-Net's
``--save_probabilities`` saves them.

``probabilities/<id>.npz`` holds one array, key ``probabilities``: float16, shape ``(K, Z, Y, X)``, class first,
then the source grid in the axis order of the mask's array (the array of ``masks/<id>.nii.gz`` read with SimpleITK,
or nibabel's array transposed; nnU-Net's layout). For NIfTI, NRRD and MHA sources ``probabilities/<id>.nii.gz`` holds
the same values as a 4D float32 NIfTI, classes on the fourth axis, with the mask's affine.

The probabilities are the model's (or the ensemble's mean) before post-processing: resampled linearly onto the source
resolution, placed back in the crop box (class 0 has probability 1 outside it) and reoriented, so their arg-max is the
mask before post-processing and each voxel's classes sum to 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from utils import fileio, geometry
from utils.geometry import GeometryRecord

NIFTI_WRITERS = ("nifti", "sitk")  # sources with a physical grid that a 4D NIfTI keeps (NIfTI, NRRD, MHA)


def source_probabilities(probabilities: np.ndarray, record: GeometryRecord) -> np.ndarray:
    """Probabilities ``(Z, Y, X, K)`` on the prepared grid put back on the source grid: ``(Z, Y, X, K)`` float32
    in the source array's order and shape."""
    cropped = geometry.resize_volume(np.asarray(probabilities, dtype=np.float32), record.cropped_shape, 1)
    full = geometry.uncrop(cropped, record.crop_box, record.oriented_shape)
    inside = np.zeros(record.oriented_shape, dtype=bool)
    inside[tuple(slice(a, b) for a, b in record.crop_box)] = True
    full[~inside, 0] = 1.0
    return geometry.undo_reorient(full, record.source_axcodes)


def write_probabilities(
    output: Path, case_id: str, probabilities: np.ndarray, record: GeometryRecord, writer: dict
) -> list[str]:
    """Write ``probabilities/<id>.npz`` (and ``.nii.gz`` for NIfTI, NRRD and MHA sources) from source-grid
    probabilities ``(Z, Y, X, K)``; returns the paths written, relative to ``output``."""
    case_id = fileio.check_case_id(case_id)
    channels_first = np.moveaxis(probabilities, -1, 0).astype(np.float16)
    written = [f"probabilities/{case_id}.npz"]

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, probabilities=channels_first)

    fileio.write_with(output / written[0], save, suffix=".npz")
    if writer.get("kind") in NIFTI_WRITERS:
        written.append(f"probabilities/{case_id}.nii.gz")
        data = np.transpose(probabilities, (2, 1, 0, 3)).astype(np.float32)
        affine = geometry.zyx_affine_to_nifti(np.asarray(record.source_affine, dtype=float))
        reference = writer.get("reference")
        if reference and str(reference).endswith((".nii", ".nii.gz")) and Path(reference).is_file():
            source = nib.load(str(reference))
            if tuple(source.shape[:3]) == data.shape[:3]:
                affine = source.affine
        image = nib.Nifti1Image(data, affine)
        fileio.write_with(output / written[1], lambda tmp: nib.save(image, str(tmp)), suffix=".nii.gz")
    return written


@dataclass
class ProbabilityWriter:
    """A callback for :func:`utils.evaluate.pipeline.segment`: takes a case's probabilities on the prepared grid,
    writes them on the source grid and keeps the paths in ``written``."""

    output: Path
    case_id: str
    record: GeometryRecord
    writer: dict
    written: list[str] = field(default_factory=list)

    def __call__(self, probabilities: np.ndarray) -> None:
        source = source_probabilities(probabilities, self.record)
        self.written = write_probabilities(self.output, self.case_id, source, self.record, self.writer)

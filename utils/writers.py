"""Write predicted masks back in the geometry (and, where it matters, the format) of the source images.

A mask arrives here as an integer ``(Z, Y, X)`` map in the *source array's* order and shape (the output of
:func:`utils.preprocessing.restore_label`) together with the case's ``writer`` record from the manifest, which
says how the source was stored. Every mask gets ``masks/<id>.nii.gz`` on the source grid; format-specific writers
can add a copy in the source's own format.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from utils import fileio, geometry


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
    data = np.transpose(mask, (2, 1, 0)).astype(np.uint8 if mask.max(initial=0) < 256 else np.int16)
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


WRITERS: dict[str, Callable[..., list[Path]]] = {}


def write_mask(mask: np.ndarray, case: dict, output_dir: str | os.PathLike) -> list[Path]:
    """Write ``masks/<id>.nii.gz`` (always) plus any format-specific copy for one manifest case entry.

    Returns:
        The paths written.
    """
    case_id = fileio.check_case_id(case["id"])
    output_dir = Path(output_dir)
    writer = case.get("writer", {})
    reference = writer.get("reference") if writer.get("kind") == "nifti" else None
    written = [
        write_nifti_mask(mask, output_dir / "masks" / f"{case_id}.nii.gz", case["geometry"]["source_affine"], reference)
    ]
    extra = WRITERS.get(writer.get("kind"))
    if extra is not None:
        written.extend(extra(mask, case, output_dir))
    return written

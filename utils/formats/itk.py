"""Files SimpleITK reads (NRRD, MHA/MHD, NIfTI): the ``files`` layout, and ``masks/<id>.nrrd`` (or ``.mha``).

- ``files``: image/label file pairs in NRRD, MHA/MHD or NIfTI matched by ``image_pattern``/``label_pattern``; they
  load with :func:`load_sitk_case` (case spec format ``sitk``).
- :func:`write_sitk_mask`: ``masks/<id>.nrrd`` (or ``.mha``) with the source's spacing, origin and direction.

:func:`read_sitk`, :func:`sitk_to_array` and :func:`sitk_geometry` serve the DICOM reader too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from utils import fileio, geometry
from utils.formats.base import (
    SITK_SUFFIXES,
    CaseData,
    CaseError,
    CaseSpec,
    DatasetSource,
    _apply_patient_pattern,
    _as_list,
    _scan_values,
    as_label_map,
    check_image,
    check_same_grid,
    finalize_source,
    inside_dataset,
    safe_id,
    strip_suffix,
)
from utils.formats.channels import PairedCase, channel_names, pair_channel_files

if TYPE_CHECKING:  # imported where used: reading another format never loads it
    import SimpleITK as sitk


def read_sitk(path: str | os.PathLike) -> sitk.Image:
    """Read any image file SimpleITK knows (NRRD, MHA/MHD, NIfTI, ...).

    Raises:
        CaseError: the file is missing or unreadable.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise CaseError(f"{path}: file not found")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = _itk_reason(error)
        if "No such file or directory" in reason:  # what MetaIO leaves in errno when the voxel data runs short
            reason = "its voxel data cannot be read: the file is truncated, or a data file it names is missing"
        raise CaseError(f"{path}: cannot read image ({reason})") from error


def _itk_reason(error: Exception) -> str:
    """The useful last line of an ITK error, in words when ITK only says it found no reader."""
    text = str(error).strip()
    if "Unable to determine ImageIO reader" in text:
        return "not an image file of a known format, or damaged beyond recognition"
    return text.splitlines()[-1] if text else type(error).__name__


def sitk_geometry(image: sitk.Image) -> dict:
    """ITK spacing/origin/direction of a 2D, 3D or 4D image as 3D lists (a 2D image gets a unit third axis)."""
    dim = image.GetDimension()
    spacing, origin = list(image.GetSpacing()), list(image.GetOrigin())
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(dim, dim)
    if dim == 2:
        spacing, origin = [*spacing, 1.0], [*origin, 0.0]
        direction = np.pad(direction, ((0, 1), (0, 1)))
        direction[2, 2] = 1.0
    return {"spacing": spacing[:3], "origin": origin[:3], "direction": direction[:3, :3].ravel().tolist()}


def sitk_to_array(image: sitk.Image, path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(Z, Y, X[, C])`` array and affine of a SimpleITK image (2D images become one slice, 4D/vector channels).

    Raises:
        CaseError: the image has a dimension other than 2, 3 or 4.
    """
    import SimpleITK as sitk

    dim = image.GetDimension()
    if dim not in (2, 3, 4):
        raise CaseError(f"{path}: expected a 2D, 3D or 4D image, found {dim} dimensions")
    array = sitk.GetArrayFromImage(image)
    if dim == 2:
        array = array[None]
    elif dim == 4:
        array = np.moveaxis(array, 0, -1)
    geo = sitk_geometry(image)
    return array, geometry.affine_from_sitk(geo["spacing"], geo["origin"], geo["direction"])


def discover_files(path: str | os.PathLike, options: dict | None = None) -> DatasetSource:
    """Image/label pairs in NRRD, MHA/MHD or NIfTI under a folder, paired by ``image_pattern``/``label_pattern``.

    The text that the wildcards of both patterns match pairs the files (``*_image.nrrd`` with ``*_label.nrrd``);
    files matching the label pattern are never taken as images. Channels in separate files: ``channel_patterns``
    (one pattern per channel, paired the same way), or images named ``<case>_0000``, ``<case>_0001`` ...
    (:mod:`utils.formats.channels`). A single image file with ``label`` works too.

    A case that lacks one of its channel files fails alone when loaded (:attr:`CaseSpec.error`).

    Raises:
        FileNotFoundError: ``path`` (or ``label``) does not exist.
        ValueError: no image matches, or two files give the same case id.
    """
    options = options or {}
    root = Path(path)
    channel_patterns = _as_list(options.get("channel_patterns"))
    if root.is_file():
        label = Path(options["label"]) if options.get("label") else None
        if label is not None and not label.is_file():
            raise FileNotFoundError(f"{label}: label file not found")
        pairs, named = [PairedCase(safe_id(strip_suffix(root.name)), [root], label)], True
        root = root.parent
    else:
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: input not found")
        image_pattern = options.get("image_pattern") or "*_image.*"
        label_pattern = options.get("label_pattern") or ("*_label.*" if not options.get("image_pattern") else None)
        pairs = pair_channel_files(root, image_pattern, label_pattern, channel_patterns, options.get("num_channels"))
        named = False
    cases = []
    for case in pairs:
        label = case.label
        image = [str(p) for p in case.images]
        spec = CaseSpec(id=case.id, format="sitk", image=image, label=str(label) if label else None, error=case.error)
        try:  # a matched file behind a symbolic link out of the folder is refused; files named by flags are the user's
            spec.image = [str(p.resolve() if named else inside_dataset(p, root)) for p in case.images]
            spec.label = str(label.resolve() if named else inside_dataset(label, root)) if label else None
        except CaseError as error:
            spec.error = spec.error or str(error)
        cases.append(spec)
    _apply_patient_pattern(cases, options.get("patient_pattern"), [Path(c.image[0]).name for c in cases])
    values = _scan_values((c.label, _sitk_label_reader(c.label)) for c in cases if c.label and not c.error)
    channels = channel_names(channel_patterns) if channel_patterns else {"0": "image"}
    if not channel_patterns and max(len(c.image) for c in cases) > 1:
        channels = {str(c): f"channel_{c:04d}" for c in range(max(len(c.image) for c in cases))}
    return finalize_source(root.name, "files", channels, cases, root, values, None, options)


def _sitk_label_reader(path: str) -> Callable[[], np.ndarray]:
    return lambda: sitk_to_array(read_sitk(path), path)[0]


def load_sitk_case(spec: CaseSpec) -> CaseData:
    """Load a case whose channels and label are files SimpleITK reads; the label must share the image grid."""
    channels, first = [], None
    for path in spec.image:
        source = read_sitk(path)
        data, affine = sitk_to_array(source, path)
        if first is None:
            first = (data.shape, affine, path, source)
        else:
            check_same_grid(first[:2], (data.shape, affine), first[2], path)
        channels.append(check_image(data, path))
    image = np.concatenate(channels, axis=-1)
    label, reference = None, first[3]
    if spec.label:
        reference = read_sitk(spec.label)
        raw, label_affine = sitk_to_array(reference, spec.label)
        check_same_grid(first[:2], (raw.shape, label_affine), first[2], spec.label)
        label = as_label_map(raw, spec.label)
    source_path = spec.label or spec.image[0]
    suffix = next((s for s in SITK_SUFFIXES if source_path.lower().endswith(s)), ".nrrd")
    writer = {
        "kind": "sitk",
        "reference": source_path,
        "extension": {".nhdr": ".nrrd", ".mhd": ".mha"}.get(suffix, suffix),
        "dimension": reference.GetDimension(),
        **sitk_geometry(reference),
    }
    return CaseData(spec.id, image, label, first[1], writer)


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

"""Plain folders of NIfTI, NRRD or MHA files matched by case name, with no pattern: the ``folders`` layout.

What it finds, in this order:

- paired folders: ``imagesTr``/``labelsTr`` (with ``imagesTs`` unlabelled), ``images``/``labels`` (or ``masks``,
  ``segmentations``, ...), or the input folder with the ``label`` option naming a label folder. An image and its
  label share the case name: ``case1.nii.gz`` in both, or ``case1_seg.nii.gz`` (:data:`LABEL_SUFFIXES`) in the label
  folder;
- images and labels side by side in one folder: ``case1.nrrd`` (or ``case1_image.nrrd``) with ``case1_seg.nrrd`` (or
  ``_label``, ``-label``, ``_mask``, ...);
- a folder of images alone (new scans): every image is an unlabelled case, so that ``evaluation.py --run R --input
  DIR`` predicts them with no flag.

Channels in separate files: ``case1_0000.nii.gz``, ``case1_0001.nii.gz`` (nnU-Net's suffixes) are the channels of case
``case1`` when every image name ends in such a number and each case's start at ``_0000``
(:func:`utils.formats.channels.group_channels`); with ``num_channels`` (prediction passes the run's) only groups of
that size are channels.
Files in sub-folders keep the sub-folder in their case id. Cases load with the SimpleITK loader (kind ``sitk``).

A case that lacks a channel file or, in paired folders, its label fails alone when loaded, with a message naming both
files (:attr:`CaseSpec.error`); a label without an image is reported and passed over; an image on another grid than
its label fails when loaded, naming both (:func:`utils.formats.base.check_same_grid`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from utils.formats.base import (
    SITK_SUFFIXES,
    CaseError,
    CaseSpec,
    DatasetSource,
    _apply_patient_pattern,
    _files_with_suffix,
    _scan_values,
    finalize_source,
    inside_dataset,
    safe_id,
    strip_suffix,
)
from utils.formats.channels import CHANNEL_SUFFIX, group_channels
from utils.formats.itk import _sitk_label_reader

log = logging.getLogger(__name__)

IMAGE_DIRS = ("imagesTr", "images", "image", "imgs", "img", "scans", "volumes")
LABEL_DIRS = ("labelsTr", "labels", "label", "masks", "mask", "segmentations", "segmentation", "seg", "gt")
UNLABELLED_DIRS = ("imagesTs",)
LABEL_SUFFIXES = ("_seg", "-seg", "_label", "-label", "_labels", "_mask", "-mask", "_gt", "_segmentation")
IMAGE_SUFFIXES = ("_image", "-image", "_img")


def case_name(stem: str) -> str:
    """A case's name from its image's stem: without an image suffix (``brain1_image`` → ``brain1``)."""
    suffix = next((s for s in IMAGE_SUFFIXES if stem.lower().endswith(s) and len(stem) > len(s)), "")
    return stem[: len(stem) - len(suffix)]


def discover_folders(path: str | os.PathLike, options: dict | None = None) -> DatasetSource:
    """Find the cases of a plain folder (see the module's notes): paired folders, pairs side by side, images alone.

    Raises:
        FileNotFoundError: the folder, or the ``label`` folder, does not exist.
        ValueError: no image file, or two files that give the same case (``a.nii.gz`` and ``a.nrrd``).
    """
    options = options or {}
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: input folder not found")
    cases = []
    for image_dir, label_dir in _folder_pairs(root, options.get("label")):
        cases += _pair_cases(root, image_dir, label_dir, options.get("num_channels"))
    if not cases:
        raise ValueError(f"{root}: no image file ({', '.join(SITK_SUFFIXES)}) found")
    _apply_patient_pattern(cases, options.get("patient_pattern"), [Path(c.image[0]).name for c in cases])
    counts = {len(c.image) for c in cases}
    channels = {"0": "image"} if counts == {1} else {str(c): f"channel_{c:04d}" for c in range(max(counts))}
    values = _scan_values((c.label, _sitk_label_reader(c.label)) for c in cases if c.label and not c.error)
    return finalize_source(root.name, "folders", channels, cases, root, values, None, options)


def _folder_pairs(root: Path, label: str | None) -> list[tuple[Path, Path | None]]:
    """``(image folder, label folder or None)`` to read: the ``label`` option's, the known sub-folders', or the
    input folder itself (with labels side by side, or none).

    Raises:
        FileNotFoundError: the ``label`` folder does not exist.
    """
    if label:
        if not Path(label).is_dir():
            raise FileNotFoundError(f"{label}: label folder not found")
        return [(root, Path(label))]
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    images = next((subdirs[n.lower()] for n in IMAGE_DIRS if n.lower() in subdirs), None)
    labels = next((subdirs[n.lower()] for n in LABEL_DIRS if n.lower() in subdirs), None)
    pairs = [(images, labels)] if images is not None else []
    pairs += [(subdirs[n.lower()], None) for n in UNLABELLED_DIRS if n.lower() in subdirs]
    return pairs or [(root, labels)]


def _keyed(files: list[Path], folder: Path) -> dict[tuple, Path]:
    """``{(sub-folder, stem): file}``.

    Raises:
        ValueError: two files of one stem.
    """
    keyed: dict[tuple, Path] = {}
    for file in files:
        key = (str(file.parent.relative_to(folder)), strip_suffix(file.name))
        if key in keyed:
            raise ValueError(f"{file}: gives the same case as {keyed[key]}; keep one of the two")
        keyed[key] = file
    return keyed


def _side_by_side_labels(files: dict[tuple, Path]) -> set[tuple]:
    """The keys of files that are the label of another file beside them (``case1_seg.nii.gz`` of ``case1.nii.gz``)."""
    stems = {(folder, case_name(CHANNEL_SUFFIX.sub(r"\1", stem))) for folder, stem in files}
    labels = set()
    for folder, stem in files:
        for suffix in LABEL_SUFFIXES:
            if stem.lower().endswith(suffix) and (folder, stem[: -len(suffix)]) in stems:
                labels.add((folder, stem))
    return labels


def _pair_cases(root: Path, image_dir: Path, label_dir: Path | None, num_channels: int | None) -> list[CaseSpec]:
    """The cases of one image folder, each with its label from ``label_dir`` (or from beside it)."""
    skip = label_dir if label_dir is not None and image_dir in label_dir.parents else None
    found = [f for f in _files_with_suffix(image_dir, SITK_SUFFIXES) if skip is None or skip not in f.parents]
    images = _keyed(found, image_dir)
    if label_dir is not None:
        labels = _keyed(_files_with_suffix(label_dir, SITK_SUFFIXES), label_dir)
    else:
        labels = {key: images.pop(key) for key in _side_by_side_labels(images)}
    used: set[tuple] = set()
    cases = []
    for (folder, stem), files in sorted(group_channels(images, num_channels).items()):
        case = case_name(stem)
        names = [(folder, name + suffix) for name in (stem, case) for suffix in ("", *LABEL_SUFFIXES)]
        key = next((name for name in names if name in labels), None)
        used.add(key)
        cases.append(_case(root, label_dir, folder, case, files, labels.get(key)))
    for key in sorted(set(labels) - used):
        log.warning("%s: label without an image (no %s in %s); passed over", labels[key], key[1], image_dir)
    return cases


def _case(
    root: Path, label_dir: Path | None, folder: str, case: str, files: list[Path], label: Path | None
) -> CaseSpec:
    """One case's spec; a missing channel file or label, or a file out of the input folder, becomes its error."""
    case_id = safe_id(case if folder in ("", ".") else f"{folder.replace(os.sep, '_')}_{case}")
    spec = CaseSpec(id=case_id, format="sitk", image=[str(f) for f in files], label=str(label) if label else None)
    try:
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise CaseError(f"{missing[0]}: channel file missing (case {case_id} has {files[0].name})")
        if label is None and label_dir is not None:
            expected = Path(label_dir, folder, case + files[0].name[len(strip_suffix(files[0].name)) :])
            raise CaseError(f"{files[0]}: no label for this image in {label_dir} (expected {expected})")
        spec.image = [str(inside_dataset(f, root)) for f in files]
        user_label = label_dir is not None and root.resolve() not in label_dir.resolve().parents
        if label is not None:  # a label folder named by the user may lie elsewhere
            spec.label = str(label.resolve() if user_label else inside_dataset(label, root))
    except CaseError as error:
        spec.error = str(error)
    return spec

"""nnU-Net v2 raw datasets: the ``nnunet`` layout.

A folder as nnU-Net v2 expects it under ``nnUNet_raw``::

    Dataset004_Hippocampus/
        dataset.json        channel_names, labels, file_ending (numTraining); no 'training' list
        imagesTr/<case>_0000.nii.gz  <case>_0001.nii.gz ...   one file per channel
        labelsTr/<case>.nii.gz
        imagesTs/<case>_0000.nii.gz ...                       unlabelled cases

``labels`` maps names to values, ``{"background": 0, "liver": 1}``; a region-based dataset lists values per region
(``{"whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}``, with ``regions_class_order``). Regions
are learned and scored here as the label values they are made of; each value is named after the region that nnU-Net
writes it for (``regions_class_order``), else ``label_<value>``. An ``ignore`` label is learned as a class, with a
warning. A ``dataset`` entry (``{case: {"images": [...], "label": ...}}``, paths relative to the folder) replaces the
file-name convention, as in nnU-Net.

Cases load with the NIfTI loader (``file_ending`` ``.nii.gz`` or ``.nii``) or the SimpleITK one (``.nrrd``, ``.mha``,
and 2D ``.png``/``.tif`` images as one-slice volumes, an RGB file giving three channels), so their masks are written
as those formats' are (a 2D image's as ``masks/<id>.nii.gz`` and a 2D ``.nrrd``).

A case that lacks a channel file or its label, or whose files lead out of the folder, fails alone when loaded, with a
message naming the files (:attr:`CaseSpec.error`); a label without an image is reported and passed over.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from utils.fileio import read_json
from utils.formats.base import (
    NIFTI_SUFFIXES,
    PNG_SUFFIXES,
    SITK_SUFFIXES,
    CaseError,
    CaseSpec,
    DatasetSource,
    finalize_source,
    inside_dataset,
    safe_id,
)

log = logging.getLogger(__name__)


def is_nnunet_v2(meta) -> bool:
    """Whether a parsed ``dataset.json`` is nnU-Net v2's: ``file_ending`` or ``channel_names``, and no ``training``
    list (MSD and nnU-Net v1 files list their cases)."""
    if not isinstance(meta, dict) or meta.get("training"):
        return False
    return "file_ending" in meta or "channel_names" in meta


def discover_nnunet(path: str | os.PathLike, options: dict | None = None) -> DatasetSource:
    """Find the cases of an nnU-Net v2 raw dataset folder: ``imagesTr`` (with ``labelsTr``) and ``imagesTs``.

    Raises:
        FileNotFoundError: ``dataset.json`` is missing.
        ValueError: ``dataset.json`` lacks ``channel_names`` or ``labels``, names a file type no reader here knows,
            holds labels that are not values, or no case is found.
    """
    root = Path(path)
    meta_path = root / "dataset.json"
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or not isinstance(meta.get("channel_names"), dict) or "labels" not in meta:
        raise ValueError(f"{meta_path}: an nnU-Net v2 dataset.json needs 'channel_names' and 'labels'")
    channels = {str(k): str(v) for k, v in sorted(meta["channel_names"].items(), key=lambda item: int(item[0]))}
    ending = str(meta.get("file_ending", ".nii.gz"))
    if ending.lower() not in (*SITK_SUFFIXES, *PNG_SUFFIXES):
        known = ", ".join((*SITK_SUFFIXES, *PNG_SUFFIXES))
        raise ValueError(f"{meta_path}: file_ending {ending!r} is not read here (known: {known})")
    kind = "nifti" if ending.lower() in NIFTI_SUFFIXES else "sitk"
    values, names = nnunet_labels(meta["labels"], meta.get("regions_class_order"), meta_path)
    if isinstance(meta.get("dataset"), dict):
        cases = [_listed_case(root, meta_path, case_id, entry, kind) for case_id, entry in meta["dataset"].items()]
    else:
        cases = _folder_cases(root, "imagesTr", "labelsTr", ending, len(channels), kind)
        cases += _folder_cases(root, "imagesTs", None, ending, len(channels), kind)
    if not cases:
        raise ValueError(f"{root}: no case in imagesTr/ or imagesTs/ (files <case>_0000{ending}, as {meta_path} says)")
    return finalize_source(meta.get("name") or root.name, "nnunet", channels, cases, root, values, names, options or {})


def nnunet_labels(raw, regions_order, meta_path: Path) -> tuple[list[int], dict[int, str]]:
    """The label values and their names of an nnU-Net v2 ``labels`` entry (``{name: value or [values]}``).

    Returns:
        ``(values, names)``: every value any label or region holds (0 included), and ``{value: name}``: the name of
        the label that is exactly that value, else of the region that nnU-Net writes it for (``regions_order``).

    Raises:
        ValueError: ``labels`` is not a mapping of names to non-negative integers (or lists of them), or has no 0.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"{meta_path}: 'labels' must map names to values, got {raw!r}")
    regions, names = [], {}
    for name, value in raw.items():
        members = value if isinstance(value, list) else [value]
        if not members or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in members):
            raise ValueError(f"{meta_path}: label {name!r} must be a value or a list of values, got {value!r}")
        if len(members) == 1:
            names.setdefault(members[0], str(name))
        else:
            regions.append((str(name), members))
    values = sorted({0, *(v for value in raw.values() for v in (value if isinstance(value, list) else [value]))})
    if 0 not in names:
        raise ValueError(f"{meta_path}: 'labels' has no background entry 0: {raw!r}")
    if "ignore" in raw:
        log.warning("%s: label 'ignore' (%s) is learned and scored as a class here (nnU-Net leaves those voxels out of "
                    "its loss; that is not done here)", meta_path, raw["ignore"])  # fmt: skip
    if regions:
        ordered = [n for n in raw if n != names[0]]
        for name, value in zip(ordered, regions_order or [], strict=False):
            if isinstance(value, int) and value not in names:
                names[value] = name
        log.info(
            "%s: region-based labels (%s) are learned and scored as the label values %s",
            meta_path,
            ", ".join(f"{n} = {'+'.join(map(str, m))}" for n, m in regions),
            values[1:],
        )
    return values, names


def _channel_files(folder: Path, case: str, ending: str, n_channels: int) -> list[Path]:
    return [folder / f"{case}_{c:04d}{ending}" for c in range(n_channels)]


def _folder_cases(
    root: Path, images: str, labels: str | None, ending: str, n_channels: int, kind: str
) -> list[CaseSpec]:
    """The cases of ``root/images`` (named ``<case>_XXXX<ending>``), labelled from ``root/labels`` when given."""
    image_dir = root / images
    if not image_dir.is_dir():
        return []
    channel_name = re.compile(rf"^(.+)_(\d{{4}}){re.escape(ending)}$", re.IGNORECASE)
    found = sorted({m.group(1) for p in image_dir.iterdir() if (m := channel_name.match(p.name)) and p.is_file()})
    label_dir = root / labels if labels else None
    cases = [_folder_case(root, image_dir, label_dir, case, ending, n_channels, kind) for case in found]
    if label_dir is not None and label_dir.is_dir():
        known = set(found)
        orphans = (p for p in label_dir.iterdir() if p.name.endswith(ending) and p.name[: -len(ending)] not in known)
        for orphan in sorted(orphans):
            expected = _channel_files(image_dir, orphan.name[: -len(ending)], ending, 1)[0]
            log.warning("%s: label without an image (expected %s); passed over", orphan, expected)
    return cases


def _folder_case(
    root: Path, image_dir: Path, label_dir: Path | None, case: str, ending: str, n_channels: int, kind: str
) -> CaseSpec:
    """One case's spec; a missing channel or label, or a file out of the folder, becomes its error. A 2D image
    (PNG, TIFF) may hold every channel in its ``_0000`` file (RGB), as nnU-Net reads it."""
    files = _channel_files(image_dir, case, ending, n_channels)
    if ending.lower() in PNG_SUFFIXES and not any(f.is_file() for f in files[1:]):
        files = files[:1]
    label = label_dir / f"{case}{ending}" if label_dir is not None else None
    spec = CaseSpec(id=safe_id(case), format=kind, image=[str(f) for f in files], label=str(label) if label else None)
    try:
        missing = [f for f in files if not f.is_file()]
        if missing:
            have = ", ".join(p.name for p in files if p.is_file())
            raise CaseError(f"{missing[0]}: channel file missing (case {case} has {have}; dataset.json lists "
                            f"{n_channels} channel(s))")  # fmt: skip
        if label is not None and not label.is_file():
            raise CaseError(f"{label}: label missing for {files[0]}")
        spec.image = [str(inside_dataset(f, root)) for f in files]
        spec.label = str(inside_dataset(label, root)) if label is not None else None
    except CaseError as error:
        spec.error = str(error)
    return spec


def _listed_case(root: Path, meta_path: Path, case: str, entry, kind: str) -> CaseSpec:
    """One case of a ``dataset`` entry (``{"images": [...], "label": ...}``, paths relative to the folder)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("images"), list) or not entry["images"]:
        raise ValueError(f"{meta_path}: dataset entry {case!r} needs a list of 'images', got {entry!r}")
    images = [root / str(p) for p in entry["images"]]
    label = root / str(entry["label"]) if entry.get("label") else None
    spec = CaseSpec(id=safe_id(case), format=kind, image=[str(p) for p in images], label=str(label) if label else None)
    try:
        for file in [*images, *([label] if label else [])]:
            resolved = inside_dataset(file, root, f"{meta_path}: case {case} lists {file}")
            if not resolved.is_file():
                raise CaseError(f"{meta_path}: case {case} lists {file}, which does not exist")
        spec.image = [str(p.resolve()) for p in images]
        spec.label = str(label.resolve()) if label else None
    except CaseError as error:
        spec.error = str(error)
    return spec

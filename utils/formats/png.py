"""2D images (PNG/JPG/TIFF/BMP): the ``png`` layout, and ``masks/<name>.png`` per slice.

- ``png``: 2D image and mask folders matched by file name, grouped into patients by a pattern (:func:`discover_png`);
  cases load with :func:`load_png_case` (case spec format ``png``).
- :func:`write_png_masks`: ``masks/<source mask name>.png`` per slice.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from utils import fileio
from utils.formats.base import (
    PNG_SUFFIXES,
    CaseData,
    CaseError,
    CaseSpec,
    DatasetSource,
    _pair_files,
    _scan_values,
    as_label_map,
    axis_aligned_affine,
    check_image,
    finalize_source,
    inside_dataset,
    parse_spacing,
    safe_id,
    strip_suffix,
)

_LABEL_DIR_NAMES = ("masks", "mask", "labels", "label", "segmentations", "seg", "gt", "ground_truth")
_IMAGE_DIR_NAMES = ("images", "image", "imgs", "img", "slices", "scans")


def _png_folders(root: Path, label: str | None) -> tuple[Path, Path | None]:
    if label:
        label_dir = Path(label)
        if not label_dir.is_dir():
            raise FileNotFoundError(f"{label_dir}: mask folder not found")
        return root, label_dir
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    images = next((subdirs[n] for n in _IMAGE_DIR_NAMES if n in subdirs), None)
    masks = next((subdirs[n] for n in _LABEL_DIR_NAMES if n in subdirs), None)
    if images is None:
        return root, masks
    return images, masks


def read_2d(path: str | os.PathLike, mask: bool = False) -> np.ndarray:
    """Read a 2D PNG/JPG/TIFF as ``(H, W, C)`` (images) or ``(H, W)`` (masks); grey RGB collapses to one channel.

    Raises:
        CaseError: unreadable file, or a colour mask.
    """
    from PIL import Image

    try:
        with Image.open(path) as handle:
            array = np.asarray(handle)
    except (OSError, ValueError) as error:
        raise CaseError(f"{path}: cannot read image ({error})") from error
    if array.ndim == 3 and array.shape[-1] in (2, 4):
        array = array[..., :-1]  # drop alpha
    if array.ndim == 3 and all(np.array_equal(array[..., 0], array[..., c]) for c in range(1, array.shape[-1])):
        array = array[..., 0]
    if mask:
        if array.ndim != 2:
            raise CaseError(f"{path}: a mask must be greyscale (one value per pixel), found colour pixels")
        return array
    return array[..., None] if array.ndim == 2 else array


def discover_png(path: str | os.PathLike, options: dict | None = None) -> DatasetSource:
    """2D slices: an image folder and a mask folder (``label``, or sub-folders ``images``/``masks``) whose files are
    paired by name (or by ``image_pattern``/``label_pattern``).

    With ``patient_pattern`` (a regex searched in the image file name), group 1 names the patient, so splits stay at
    patient level; with a second group (the slice number), each patient's slices are stacked, in that order, into one
    volume case. Without it every file is a one-slice case. Mask values are remapped to contiguous classes
    (``0/255`` → ``0/1``, written back as 255) or binarised with ``binarize``.

    A case whose slices cannot all be paired with masks, repeat a slice number, or lead out of their folder (a
    symbolic link) fails when loaded (:attr:`CaseSpec.error`), and so does one whose files cannot be read; the other
    cases go on.

    Raises:
        FileNotFoundError: a folder is missing.
        ValueError: no image, no readable image, a patient pattern that does not match.
    """
    options = options or {}
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    images_dir, masks_dir = _png_folders(root, options.get("label"))
    image_pattern = options.get("image_pattern") or "*"
    label_pattern = options.get("label_pattern") or (image_pattern if masks_dir is not None else None)
    pairs = _pair_files(images_dir, image_pattern, label_pattern, PNG_SUFFIXES, masks_dir)
    if masks_dir is not None:
        pairs = [(k, i, m) for k, i, m in pairs if masks_dir not in i.parents]
    spacing = parse_spacing(options.get("source_spacing"), "spacing")
    cases = _group_png(pairs, options.get("patient_pattern"), spacing, (images_dir, masks_dir or images_dir))
    channels = _png_channels(cases)
    for spec in cases:
        spec.channels = len(channels)
    values = _scan_values((m, lambda m=m: read_2d(m, mask=True)[None]) for c in cases if not c.error for m in c.masks)
    return finalize_source(root.name, "png", channels, cases, root, values, None, options)


def _png_channels(cases: list[CaseSpec]) -> dict[str, str]:
    """The channels of the first image that reads (a case whose image does not read fails when loaded).

    Raises:
        ValueError: no case has a readable first image.
    """
    errors = []
    for spec in cases:
        if spec.error:
            continue
        try:
            first = read_2d(spec.image[0])
        except CaseError as error:
            errors.append(str(error))
            continue
        if first.shape[-1] == 1:
            return {"0": "image"}
        return {str(c): "RGB"[c] if c < 3 else f"c{c}" for c in range(first.shape[-1])}
    raise ValueError(f"no image could be read ({errors[0] if errors else cases[0].error}, ...)")


def _group_png(pairs: list, pattern: str | None, spacing: list | None, roots: tuple[Path, Path]) -> list[CaseSpec]:
    """One spec per image (or per patient's stack of slices with a two-group ``pattern``), every file checked to lie
    in its folder (``roots``: the image and the mask folder)."""
    regex = re.compile(pattern) if pattern else None
    groups: dict[str, list] = {}
    patients = {}
    for _key, image, mask in pairs:
        if regex is None:
            case_id = safe_id(strip_suffix(image.name))
            groups[case_id] = [(0, image, mask)]
            patients[case_id] = case_id
            continue
        match = regex.search(image.name)
        if match is None or not match.groups():
            raise ValueError(f"{image}: the patient pattern {pattern!r} does not match (it needs a group)")
        if len(match.groups()) >= 2:
            case_id = safe_id(image.name[: match.end(1)])
            slice_key = match.group(2)
            order = int(slice_key) if slice_key.isdigit() else slice_key
        else:
            case_id, order = safe_id(strip_suffix(image.name)), 0
        groups.setdefault(case_id, []).append((order, image, mask))
        patients[case_id] = safe_id(match.group(1))
    cases = []
    for case_id, members in sorted(groups.items()):
        members.sort(key=lambda m: (isinstance(m[0], str), m[0]))
        masks = [str(m) if m else None for _, _, m in members]
        spec = CaseSpec(
            id=case_id,
            patient=patients[case_id],
            format="png",
            image=[str(i) for _, i, _ in members],
            label=next((m for m in masks if m), None),
            masks=masks if all(masks) else [],
            spacing=spacing or [1.0, 1.0, 1.0],
        )
        try:
            _check_slices(members, case_id)
            spec.image = [str(inside_dataset(i, roots[0])) for _, i, _ in members]
            spec.masks = [str(inside_dataset(m, roots[1])) for m in spec.masks]
            spec.label = spec.masks[0] if spec.masks else None
        except CaseError as error:
            spec.error = str(error)
        cases.append(spec)
    return cases


def _check_slices(members: list, case_id: str) -> None:
    """Refuse a case whose slice numbers repeat, or whose slices are masked only in part (:class:`CaseError`)."""
    orders = [m[0] for m in members]
    if len(set(orders)) != len(orders):
        raise CaseError(f"{members[0][1]}: slice numbers repeat within {case_id!r}; check --patient-pattern")
    masks = [m for _, _, m in members]
    if any(masks) and not all(masks):
        missing = next(str(i) for _, i, m in members if m is None)
        raise CaseError(f"{missing}: has no mask while other slices of {case_id!r} have one")


def load_png_case(spec: CaseSpec) -> CaseData:
    """Stack a case's 2D slices into ``(Z, H, W, C)`` (and masks into ``(Z, H, W)``)."""
    slices = [read_2d(p) for p in spec.image]
    for path, array in zip(spec.image, slices, strict=True):
        if array.shape != slices[0].shape:
            raise CaseError(f"{path}: size {array.shape} differs from {spec.image[0]} {slices[0].shape}")
    image = np.stack(slices)
    if spec.channels is not None and image.shape[-1] != spec.channels:
        raise CaseError(f"{spec.image[0]}: {image.shape[-1]} channels, the dataset has {spec.channels}")
    label = None
    if spec.masks:
        masks = []
        for mask_path, image_path in zip(spec.masks, spec.image, strict=True):
            mask = read_2d(mask_path, mask=True)
            if mask.shape != image.shape[1:3]:
                raise CaseError(
                    f"{mask_path}: size {mask.shape} differs from its image {image_path} {image.shape[1:3]}"
                )
            masks.append(mask)
        label = as_label_map(np.stack(masks), spec.masks[0])
    names = [Path(p).name for p in (spec.masks or spec.image)]
    writer = {"kind": "png", "files": [strip_suffix(n) + ".png" for n in names]}
    return CaseData(spec.id, check_image(image, spec.image[0]), label, axis_aligned_affine(spec.spacing), writer)


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

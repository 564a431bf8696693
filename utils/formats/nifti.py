"""NIfTI: the Medical Segmentation Decathlon (``msd``) and BraTS (``brats``) layouts, and ``masks/<id>.nii.gz``.

- ``msd``: Medical Segmentation Decathlon folder (``dataset.json``, ``imagesTr``, ``labelsTr``), NIfTI, 4D = channels.
- ``brats``: BraTS case folders (``<case>_flair|t1|t1ce|t2.nii.gz`` + ``<case>_seg.nii.gz``; BraTS 2023 names too).

Both load with :func:`load_nifti_case` (case spec format ``nifti``). :func:`write_nifti_mask` writes the
``masks/<id>.nii.gz`` on the source grid that :func:`utils.formats.write_mask` writes for every source, whatever its
format; for NIfTI sources it is the copy in their own format (reusing the source header).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from utils import fileio, geometry
from utils.fileio import check_case_id, read_json
from utils.formats.base import (
    CaseData,
    CaseError,
    CaseSpec,
    DatasetSource,
    as_label_map,
    check_image,
    check_same_grid,
    finalize_source,
    inside_dataset,
    safe_id,
    strip_suffix,
)
from utils.formats.nnunet import is_nnunet_v2

BRATS_MODALITIES = {
    "2020": (
        ("flair", "t1", "t1ce", "t2"),
        "seg",
        {1: "necrotic tumour core", 2: "peritumoral edema", 4: "enhancing tumour"},
    ),
    "2023": (
        ("t2f", "t1n", "t1c", "t2w"),
        "seg",
        {1: "necrotic tumour core", 2: "peritumoral edema", 3: "enhancing tumour"},
    ),
}


def read_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file as a ``(Z, Y, X[, C])`` array and its affine.

    Raises:
        CaseError: the file is missing, truncated, corrupt or not 3D/4D.
    """
    path = Path(path)
    if not path.is_file():
        raise CaseError(f"{path}: file not found")
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises many types for damaged files
        if "Cannot work out file type" in str(error):
            raise CaseError(
                f"{path}: cannot read NIfTI file (its header is not a NIfTI-1 or NIfTI-2 header)"
            ) from error
        raise CaseError(f"{path}: cannot read NIfTI file ({type(error).__name__}: {error})") from error
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim not in (3, 4):
        raise CaseError(f"{path}: expected a 3D (or 4D multi-channel) image, found shape {data.shape}")
    axes = (2, 1, 0, 3) if data.ndim == 4 else (2, 1, 0)
    return np.transpose(data, axes), geometry.nifti_affine_to_zyx(image.affine)


def load_nifti_case(spec: CaseSpec) -> CaseData:
    """Load a case whose image channels and label are NIfTI files (MSD and BraTS layouts)."""
    channels, affine, first = [], None, None
    for path in spec.image:
        data, data_affine = read_nifti(path)
        if first is None:
            first, affine = (data.shape, data_affine, path), data_affine
        else:
            check_same_grid(first[:2], (data.shape, data_affine), first[2], path)
        channels.append(check_image(data, path))
        del data  # the source dtype's copy is freed before the next file is read
    image = channels[0] if len(channels) == 1 else np.concatenate(channels, axis=-1)
    del channels
    label = None
    if spec.label:
        raw, label_affine = read_nifti(spec.label)
        check_same_grid((image.shape, affine), (raw.shape, label_affine), spec.image[0], spec.label)
        label = as_label_map(raw, spec.label)
    reference = spec.label or spec.image[0]
    return CaseData(spec.id, image, label, affine, {"kind": "nifti", "reference": str(reference)})


def discover_msd(path: str | os.PathLike, options: dict | None = None) -> DatasetSource:
    """Find the cases of a Medical Segmentation Decathlon folder (``dataset.json``, ``imagesTr``, ``labelsTr``,
    ``imagesTs``). 4D multi-modal images become channels; nnU-Net style ``_0000`` channel files work too.

    A listed file that is missing, or whose path leads out of the folder (through ``..`` or a symbolic link), makes
    that case fail when loaded (:attr:`CaseSpec.error`) and is never opened; the other cases go on.

    Raises:
        FileNotFoundError: ``dataset.json`` is missing.
        ValueError: ``dataset.json`` is not valid JSON, lacks ``labels`` or lists no case, an entry has no image, or
            two cases share an id.
    """
    root = Path(path)
    meta_path = root / "dataset.json"
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or "labels" not in meta:
        raise ValueError(f"{meta_path}: missing the 'labels' entry")
    channels = {
        str(k): str(v) for k, v in (meta.get("modality") or meta.get("channel_names") or {"0": "image"}).items()
    }
    labels = _msd_labels(meta["labels"], meta_path)
    cases = []
    for key in ("training", "test"):
        for entry in meta.get(key) or []:
            image, label = _msd_entry(entry, key, meta_path)
            cases.append(_msd_spec(root, meta_path, image, label if key == "training" else None, len(channels)))
    if not cases:
        hint = " (an nnU-Net v2 dataset.json: use --format nnunet or auto)" if is_nnunet_v2(meta) else ""
        raise ValueError(f"{meta_path}: lists no cases under 'training' or 'test'{hint}")
    names = {int(k): v for k, v in labels.items()}
    return finalize_source(meta.get("name", root.name), "msd", channels, cases, root, names, names, options or {})


def _msd_entry(entry, key: str, meta_path: Path) -> tuple[str, str | None]:
    """The image and label paths of one ``training`` or ``test`` entry (an object, or a bare image path).

    Raises:
        ValueError: an entry without an image path.
    """
    image = entry.get("image") if isinstance(entry, dict) else entry
    label = entry.get("label") if isinstance(entry, dict) else None
    if not isinstance(image, str) or not image or not (label is None or isinstance(label, str)):
        raise ValueError(f"{meta_path}: an entry of '{key}' is not an image path or an image/label pair: {entry!r}")
    return image, label or None


def _msd_labels(raw: dict, meta_path: Path) -> dict[str, str]:
    try:
        labels = {str(int(k)): str(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        # nnU-Net v2 style: {"background": 0, "liver": 1}
        try:
            labels = {str(int(v)): str(k) for k, v in raw.items()}
        except (TypeError, ValueError) as error:
            raise ValueError(f"{meta_path}: cannot read 'labels' {raw!r}") from error
    if "0" not in labels:
        raise ValueError(f"{meta_path}: 'labels' has no background entry 0: {raw!r}")
    return dict(sorted(labels.items(), key=lambda item: int(item[0])))


def _msd_spec(root: Path, meta_path: Path, image: str, label: str | None, n_channels: int) -> CaseSpec:
    """The spec of one listed case; a listed file that is missing or lies outside ``root`` becomes its error."""
    case_id = check_case_id(strip_suffix(Path(image).name), meta_path)
    try:
        images = _msd_images(root, meta_path, image, n_channels)
        label_path = _msd_file(root, f"{meta_path}: lists label {label}", label) if label else None
    except CaseError as error:
        listed_label = str(root / label) if label else None
        return CaseSpec(id=case_id, format="nifti", image=[str(root / image)], label=listed_label, error=str(error))
    return CaseSpec(id=case_id, format="nifti", image=images, label=label_path)


def _msd_images(root: Path, meta_path: Path, image: str, n_channels: int) -> list[str]:
    """The listed image, or its nnU-Net channel files ``<stem>_0000.nii.gz`` ... when it does not exist.

    Raises:
        CaseError: a file outside ``root``, or neither the image nor all of its channel files exist.
    """
    where = f"{meta_path}: lists {image}"
    path = inside_dataset(root / image, root, where)
    if path.is_file():
        return [str(path)]
    stem = strip_suffix(path.name)
    channels = [inside_dataset(path.with_name(f"{stem}_{c:04d}.nii.gz"), root, where) for c in range(n_channels)]
    if not all(channel.is_file() for channel in channels):
        raise CaseError(f"{where}, but {path} does not exist")
    return [str(channel) for channel in channels]


def _msd_file(root: Path, where: str, listed: str) -> str:
    """A listed file, resolved; refused when it lies outside ``root`` or does not exist (:class:`CaseError`)."""
    path = inside_dataset(root / listed, root, where)
    if not path.is_file():
        raise CaseError(f"{where}, but {path} does not exist")
    return str(path)


def _brats_files(folder: Path) -> tuple[str, dict[str, Path]] | None:
    files = {p.name.lower(): p for p in folder.iterdir() if p.is_file()}
    for release, (modalities, seg, _) in BRATS_MODALITIES.items():
        found = {}
        for suffix in (*modalities, seg):
            for name, file in files.items():
                if re.search(rf"[_-]{suffix}\.nii(\.gz)?$", name):
                    found[suffix] = file
        if any(m in found for m in modalities):
            return release, found
    return None


def discover_brats(path: str | os.PathLike, options: dict | None = None) -> DatasetSource:
    """BraTS case folders: ``<case>/<case>_flair|t1|t1ce|t2.nii.gz`` + ``<case>_seg.nii.gz`` (BraTS 2018-2021) or
    ``<case>-t2f|t1n|t1c|t2w.nii.gz`` + ``<case>-seg.nii.gz`` (BraTS 2023), four channels; folders without a
    segmentation become unlabelled cases. Labels 1, 2, 4 (or 1, 2, 3) become classes 1, 2, 3.

    A folder that lacks one of the four modalities, or holds a file that leads out of the dataset folder (a symbolic
    link), is a case that fails when loaded (:attr:`CaseSpec.error`); the other cases go on.

    Raises:
        ValueError: no case folder, or folders of both releases mixed.
    """
    options = options or {}
    root = Path(path)
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    cases, releases = [], set()
    for folder in folders:
        found = _brats_files(folder)
        if found is None:
            continue
        release, files = found
        releases.add(release)
        cases.append(_brats_spec(root, folder, files, *BRATS_MODALITIES[release][:2]))
    if not cases:
        raise ValueError(f"{root}: no BraTS case folder (<case>/<case>_flair.nii.gz ...) found")
    if len(releases) > 1:
        raise ValueError(f"{root}: mixes BraTS 2018-2021 and 2023 file names; convert one set first")
    release = releases.pop()
    modalities, _, names = BRATS_MODALITIES[release]
    channels = {str(i): m.upper() for i, m in enumerate(modalities)}
    return finalize_source(root.name, "brats", channels, cases, root, names, names, options)


def _brats_spec(root: Path, folder: Path, files: dict[str, Path], modalities: tuple, seg: str) -> CaseSpec:
    """One BraTS case folder's spec; a missing modality or a file outside ``root`` becomes its error."""
    case_id = safe_id(folder.name)
    label = files.get(seg)
    try:
        missing = [m for m in modalities if m not in files]
        if missing:
            raise CaseError(f"{folder}: BraTS case lacks the {', '.join(missing)} image(s)")
        images = [str(inside_dataset(files[m], root)) for m in modalities]
        label = inside_dataset(label, root) if label else None
    except CaseError as error:
        found = [str(files[m]) for m in modalities if m in files] or [str(folder)]
        return CaseSpec(id=case_id, format="nifti", image=found, label=str(label) if label else None, error=str(error))
    return CaseSpec(id=case_id, format="nifti", image=images, label=str(label) if label else None)


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

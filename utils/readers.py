"""Readers: every input format becomes the same thing, a list of case specs and, per case, a :class:`CaseData`.

Reading happens in two steps so that work can be spread over processes and recorded in JSON:

1. ``discover(path, fmt, options)`` looks at the input and returns a :class:`DatasetSource`: the dataset's name,
   labels, channel names and one *case spec* per case. A case spec is a plain JSON-able dict
   ``{"id", "patient", "format", "image": [paths], "label": path or None, ...}``.
2. ``load_case(spec)`` reads one case and returns a :class:`CaseData`: the image ``(Z, Y, X, C)`` float32, the label
   ``(Z, Y, X)`` integer map or ``None``, the affine of the arrays (see :mod:`utils.geometry`) and the information the
   writer needs to put a mask back in the source file's own format.

Everything after the readers is format-blind.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from utils import geometry
from utils.fileio import check_case_id, read_json

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class CaseError(ValueError):
    """A case cannot be read or is inconsistent; the message names the file and the problem."""


@dataclass
class CaseData:
    """One case as every reader returns it.

    Attributes:
        case_id: safe identifier, used in output file names.
        image: ``(Z, Y, X, C)`` float32, channels last, in the source's own array order.
        label: ``(Z, Y, X)`` integer label map on the image grid, or ``None`` when unlabelled.
        affine: 4x4 map from array index ``(z, y, x)`` to RAS world mm.
        writer: what the mask writer needs to write into the source's format (``{"kind": "nifti", ...}``).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    writer: dict = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return geometry.spacing_from_affine(self.affine)


@dataclass
class DatasetSource:
    """What ``discover`` finds: dataset-level facts and one spec per case."""

    name: str
    format: str
    labels: dict[str, str]
    channels: dict[str, str]
    cases: list[dict]
    path: str = ""


def strip_suffix(name: str) -> str:
    """File name without its image suffix (``case_01.nii.gz`` → ``case_01``)."""
    for suffix in (
        *NIFTI_SUFFIXES,
        ".nrrd",
        ".nhdr",
        ".mha",
        ".mhd",
        ".h5",
        ".hdf5",
        ".png",
        ".jpg",
        ".jpeg",
    ):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


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
        raise CaseError(f"{path}: cannot read NIfTI file ({type(error).__name__}: {error})") from error
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim not in (3, 4):
        raise CaseError(f"{path}: expected a 3D (or 4D multi-channel) image, found shape {data.shape}")
    axes = (2, 1, 0, 3) if data.ndim == 4 else (2, 1, 0)
    return np.transpose(data, axes), geometry.nifti_affine_to_zyx(image.affine)


def as_label_map(label: np.ndarray, path: str | os.PathLike, allowed: set[int] | None = None) -> np.ndarray:
    """Check that ``label`` holds integer class values (stored as any dtype) and return it as uint8/int16.

    Raises:
        CaseError: non-integer or non-finite values, or values outside ``allowed``.
    """
    if label.ndim == 4 and label.shape[3] == 1:
        label = label[..., 0]
    if not np.issubdtype(label.dtype, np.integer):
        if not np.all(np.isfinite(label)):
            raise CaseError(f"{path}: label holds NaN or Inf values")
        rounded = np.rint(label)
        if not np.array_equal(rounded, label):
            raise CaseError(f"{path}: label holds non-integer values (e.g. {label[rounded != label].flat[0]!r})")
        label = rounded
    values = np.unique(label)
    if values.size and (values.min() < 0 or values.max() > np.iinfo(np.int16).max):
        raise CaseError(f"{path}: label values out of range: {values.min()}..{values.max()}")
    if allowed is not None:
        unknown = sorted(set(values.astype(int).tolist()) - allowed)
        if unknown:
            raise CaseError(f"{path}: label values {unknown} are not among the dataset's labels {sorted(allowed)}")
    dtype = np.uint8 if values.size == 0 or values.max() < 256 else np.int16
    return label.astype(dtype)


def check_image(image: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """Return ``image`` as float32 ``(Z, Y, X, C)``, refusing NaN/Inf and constant-zero images.

    Raises:
        CaseError: the image holds NaN or Inf voxels or is not 3D.
    """
    if image.ndim == 3:
        image = image[..., None]
    if image.ndim != 4:
        raise CaseError(f"{path}: expected a 3D image, found shape {image.shape}")
    image = image.astype(np.float32, copy=False)
    bad = ~np.isfinite(image)
    if bad.any():
        raise CaseError(f"{path}: image holds {int(bad.sum())} NaN or Inf voxels")
    return image


def check_same_grid(reference: tuple, other: tuple, ref_path, other_path, tolerance: float = 1e-3) -> None:
    """Refuse an image/label (or channel) pair whose shapes or affines differ.

    ``reference`` and ``other`` are ``(shape, affine)``; affines may differ by ``tolerance`` mm (relative to the voxel
    size) to allow float rounding in file headers.

    Raises:
        CaseError: naming both files, the shapes or the geometry difference.
    """
    (ref_shape, ref_affine), (shape, affine) = reference, other
    if tuple(ref_shape[:3]) != tuple(shape[:3]):
        raise CaseError(f"{other_path}: shape {tuple(shape[:3])} differs from {ref_path} {tuple(ref_shape[:3])}")
    scale = max(1.0, float(np.abs(ref_affine[:3, :3]).max()))
    if not np.allclose(ref_affine, affine, atol=tolerance * scale, rtol=0):
        raise CaseError(
            f"{other_path}: geometry (spacing, origin or direction) differs from {ref_path}: "
            f"affine\n{np.round(affine, 4)}\nvs\n{np.round(ref_affine, 4)}"
        )


def load_nifti_case(spec: dict, allowed_labels: set[int] | None = None) -> CaseData:
    """Load a case whose image channels and label are NIfTI files (MSD and file-pair layouts)."""
    channels, affine, first = [], None, None
    for path in spec["image"]:
        data, data_affine = read_nifti(path)
        if first is None:
            first, affine = (data.shape, data_affine, path), data_affine
        else:
            check_same_grid(first[:2], (data.shape, data_affine), first[2], path)
        channels.append(check_image(data, path))
    image = np.concatenate(channels, axis=-1)
    label = None
    if spec.get("label"):
        raw, label_affine = read_nifti(spec["label"])
        check_same_grid((image.shape, affine), (raw.shape, label_affine), spec["image"][0], spec["label"])
        label = as_label_map(raw, spec["label"], allowed_labels)
    reference = spec.get("label") or spec["image"][0]
    return CaseData(spec["id"], image, label, affine, {"kind": "nifti", "reference": str(reference)})


def discover_msd(path: str | os.PathLike, options: dict | None = None) -> DatasetSource:
    """Find the cases of a Medical Segmentation Decathlon folder (``dataset.json``, ``imagesTr``, ``labelsTr``,
    ``imagesTs``). 4D multi-modal images become channels; nnU-Net style ``_0000`` channel files work too.

    Raises:
        FileNotFoundError: ``dataset.json`` or a file it names is missing.
        ValueError: ``dataset.json`` lacks ``labels`` or ``training``, or two cases share an id.
    """
    root = Path(path)
    meta_path = root / "dataset.json"
    meta = read_json(meta_path)
    for key in ("labels",):
        if key not in meta:
            raise ValueError(f"{meta_path}: missing the '{key}' entry")
    channels = {
        str(k): str(v) for k, v in (meta.get("modality") or meta.get("channel_names") or {"0": "image"}).items()
    }
    labels = _msd_labels(meta["labels"], meta_path)
    cases, seen = [], set()
    for entry in meta.get("training", []):
        image = entry["image"] if isinstance(entry, dict) else entry
        label = entry.get("label") if isinstance(entry, dict) else None
        cases.append(_msd_spec(root, meta_path, image, label, len(channels)))
    for entry in meta.get("test", []):
        image = entry["image"] if isinstance(entry, dict) else entry
        cases.append(_msd_spec(root, meta_path, image, None, len(channels)))
    if not cases:
        raise ValueError(f"{meta_path}: lists no cases under 'training' or 'test'")
    for spec in cases:
        if spec["id"] in seen:
            raise ValueError(f"{meta_path}: case id {spec['id']!r} appears twice")
        seen.add(spec["id"])
    return DatasetSource(meta.get("name", root.name), "msd", labels, channels, cases, str(root))


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


def _msd_spec(root: Path, meta_path: Path, image: str, label: str | None, n_channels: int) -> dict:
    image_path = (root / image).resolve()
    case_id = check_case_id(strip_suffix(image_path.name), meta_path)
    if image_path.is_file():
        images = [str(image_path)]
    else:
        stem = strip_suffix(image_path.name)
        images = [str(image_path.with_name(f"{stem}_{c:04d}.nii.gz")) for c in range(n_channels)]
        if not all(Path(p).is_file() for p in images):
            raise FileNotFoundError(f"{meta_path}: lists {image}, but {image_path} does not exist")
    label_path = None
    if label:
        label_path = (root / label).resolve()
        if not label_path.is_file():
            raise FileNotFoundError(f"{meta_path}: lists label {label}, but {label_path} does not exist")
        label_path = str(label_path)
    return {"id": case_id, "patient": case_id, "format": "nifti", "image": images, "label": label_path}


DISCOVERERS: dict[str, Callable[..., DatasetSource]] = {"msd": discover_msd}
LOADERS: dict[str, Callable[..., CaseData]] = {"nifti": load_nifti_case}


def detect_format(path: str | os.PathLike) -> str:
    """Guess the input format of ``path``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: no known layout matches.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: input not found")
    if path.is_dir() and (path / "dataset.json").is_file():
        return "msd"
    raise ValueError(f"{path}: cannot tell the input format; pass --format ({', '.join(sorted(DISCOVERERS))})")


def discover(path: str | os.PathLike, fmt: str = "auto", options: dict | None = None) -> DatasetSource:
    """Find the cases under ``path`` in format ``fmt`` (``auto`` detects it)."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in DISCOVERERS:
        raise ValueError(f"unknown input format {fmt!r}; known: auto, {', '.join(sorted(DISCOVERERS))}")
    return DISCOVERERS[fmt](path, options or {})


def load_case(spec: dict, allowed_labels: set[int] | None = None) -> CaseData:
    """Read one case described by a spec from :func:`discover`."""
    loader = LOADERS.get(spec.get("format"))
    if loader is None:
        raise ValueError(f"case {spec.get('id')!r}: no reader for format {spec.get('format')!r}")
    return loader(spec, allowed_labels)

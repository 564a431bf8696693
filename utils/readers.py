"""Readers: every input format becomes the same thing, a list of case specs and, per case, a :class:`CaseData`.

Reading happens in two steps so that work can be spread over processes and recorded in JSON:

1. ``discover(path, fmt, options)`` looks at the input and returns a :class:`DatasetSource`: the dataset's name,
   labels, channel names and one *case spec* per case. A case spec is a plain JSON-able dict
   ``{"id", "patient", "format", "image": [paths], "label": path or None, ...}``.
2. ``load_case(spec)`` reads one case and returns a :class:`CaseData`: the image ``(Z, Y, X, C)`` float32, the label
   ``(Z, Y, X)`` integer map or ``None``, the affine of the arrays (see :mod:`utils.geometry`) and the information the
   writer needs to put a mask back in the source file's own format.

Formats (``DISCOVERERS``, each auto-detected by :func:`detect_format`):

- ``msd``: Medical Segmentation Decathlon folder (``dataset.json``, ``imagesTr``, ``labelsTr``), NIfTI, 4D = channels.
- ``files``: image/label file pairs in NRRD, MHA/MHD or NIfTI matched by ``image_pattern``/``label_pattern``.
- ``hdf5``: the Kaggle soft-tissue-sarcoma layout (groups ``ct_data``, ``pet_data``, ``label_data`` holding one
  dataset per patient) or any layout named by ``hdf5_image_keys``/``hdf5_label_key``, stacked samples included.
- ``brats``: BraTS case folders (``<case>_flair|t1|t1ce|t2.nii.gz`` + ``<case>_seg.nii.gz``; BraTS 2023 names too).
- ``dicom``: DICOM series under a folder, labels from a NIfTI/NRRD file, a DICOM-SEG or an RTSTRUCT.
- ``png``: 2D image and mask folders (PNG/JPG/TIFF) matched by file name, grouped into patients by a pattern.

Labels are remapped to contiguous classes ``0..K-1`` (after the user's ``label_map`` and ``binarize``); the value each
class had in the source is kept in ``label_values`` so that writers put the source values back.

Everything after the readers is format-blind.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import SimpleITK as sitk

from utils import geometry
from utils.fileio import check_case_id, read_json

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SITK_SUFFIXES = (*NIFTI_SUFFIXES, ".nrrd", ".nhdr", ".mha", ".mhd")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
PNG_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NOT_DICOM_SUFFIXES = (*SITK_SUFFIXES, *HDF5_SUFFIXES, *PNG_SUFFIXES, ".json", ".txt", ".md", ".csv", ".py", ".gz")
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
_LABEL_DIR_NAMES = ("masks", "mask", "labels", "label", "segmentations", "seg", "gt", "ground_truth")
_IMAGE_DIR_NAMES = ("images", "image", "imgs", "img", "slices", "scans")


class CaseError(ValueError):
    """A case cannot be read or is inconsistent; the message names the file and the problem."""


@dataclass
class CaseData:
    """One case as every reader returns it.

    Attributes:
        case_id: safe identifier, used in output file names.
        image: ``(Z, Y, X, C)`` float32, channels last, in the source's own array order.
        label: ``(Z, Y, X)`` integer label map on the image grid (contiguous classes), or ``None`` when unlabelled.
        affine: 4x4 map from array index ``(z, y, x)`` to RAS world mm.
        writer: what the mask writer needs to write into the source's format (``{"kind": "nifti", ...}``), including
            ``label_values`` (source value of each class) when the classes were remapped.
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
    """What ``discover`` finds: dataset-level facts and one spec per case.

    Attributes:
        labels: ``{"0": "background", "1": name, ...}`` over the contiguous classes.
        label_values: the source value written back for each class (``label_values[k]`` for class ``k``).
    """

    name: str
    format: str
    labels: dict[str, str]
    channels: dict[str, str]
    cases: list[dict]
    path: str = ""
    label_values: list[int] = field(default_factory=list)


def strip_suffix(name: str) -> str:
    """File name without its image suffix (``case_01.nii.gz`` → ``case_01``)."""
    for suffix in (*SITK_SUFFIXES, *HDF5_SUFFIXES, *PNG_SUFFIXES, ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def safe_id(text: str) -> str:
    """Turn a file or folder name into a case id that :func:`check_case_id` accepts."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._-")
    cleaned = re.sub(r"\.{2,}", ".", cleaned)
    return cleaned or "case"


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


def read_sitk(path: str | os.PathLike) -> sitk.Image:
    """Read any image file SimpleITK knows (NRRD, MHA/MHD, NIfTI, ...).

    Raises:
        CaseError: the file is missing or unreadable.
    """
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


def as_label_map(label: np.ndarray, path: str | os.PathLike, allowed: set[int] | None = None) -> np.ndarray:
    """Check that ``label`` holds integer class values (stored as any dtype) and return it as uint8/int16.

    Raises:
        CaseError: non-integer or non-finite values, or values outside ``allowed``.
    """
    if label.ndim == 4 and label.shape[3] == 1:
        label = label[..., 0]
    if label.ndim != 3:
        raise CaseError(f"{path}: a label map must be 3D (one class per voxel), found shape {label.shape}")
    if not np.issubdtype(label.dtype, np.integer):
        if not np.all(np.isfinite(label)):
            raise CaseError(f"{path}: label holds NaN or Inf values")
        rounded = np.rint(label)
        if not np.array_equal(rounded, label):
            raise CaseError(f"{path}: label holds non-integer values (e.g. {float(label[rounded != label].flat[0]):g})")
        label = rounded
    values = np.unique(label)
    if values.size and (values.min() < 0 or values.max() > np.iinfo(np.int16).max):
        raise CaseError(f"{path}: label values out of range: {values.min()}..{values.max()}")
    if allowed is not None:
        check_label_values(values, allowed, path)
    dtype = np.uint8 if values.size == 0 or values.max() < 256 else np.int16
    return label.astype(dtype)


def check_label_values(values: np.ndarray, allowed: set[int], path: str | os.PathLike) -> None:
    """Refuse label values outside ``allowed``.

    Raises:
        CaseError: naming the file, the unknown values and the allowed ones.
    """
    unknown = sorted(set(np.unique(values).astype(int).tolist()) - set(allowed))
    if unknown:
        raise CaseError(f"{path}: label values {unknown} are not among the dataset's labels {sorted(allowed)}")


def check_image(image: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """Return ``image`` as float32 ``(Z, Y, X, C)``, refusing NaN/Inf voxels.

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


def axis_aligned_affine(spacing: Sequence[float]) -> np.ndarray:
    """Affine for sources without orientation (HDF5, PNG): array axes ``(z, y, x)`` point to ``(S, A, R)``.

    Prepared volumes use that orientation, so such arrays are never flipped or permuted.
    """
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = float(spacing[0]), float(spacing[1]), float(spacing[2]), 1
    return affine


def parse_spacing(value, where: str) -> list[float] | None:
    """One number (isotropic) or three ``Z Y X`` positive numbers in mm, or ``None``.

    Raises:
        ValueError: anything else, quoting ``where`` and the value.
    """
    if value is None:
        return None
    values = [value] if np.isscalar(value) else list(np.asarray(value, dtype=float).ravel())
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: spacing must be numbers, got {value!r}") from error
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or min(values) <= 0:
        raise ValueError(f"{where}: spacing must be one or three positive numbers (Z Y X mm), got {value!r}")
    return values


def build_label_lookup(
    values: Iterable[int], label_map: dict | None = None, binarize: bool = False
) -> tuple[dict[int, int], list[int]]:
    """Map the label values of a source to contiguous classes ``0..K-1``.

    Args:
        values: every label value the source holds or declares (background 0 is added).
        label_map: remapping ``{source value: new value}`` applied first (``--label-map 4:3``).
        binarize: map every non-zero value (after ``label_map``) to 1.

    Returns:
        ``(lookup, label_values)``: ``lookup`` maps each source value to its class; ``label_values[k]`` is the value
        writers put back for class ``k``: the source value when exactly one maps to ``k``, else the mapped value.

    Raises:
        ValueError: a negative value in ``label_map``.
    """
    label_map = {int(k): int(v) for k, v in (label_map or {}).items()}
    if any(v < 0 for v in label_map.values()) or any(k < 0 for k in label_map):
        raise ValueError(f"label map values must be non-negative integers, got {label_map}")
    values = sorted({0, *(int(v) for v in values)})
    mapped = {v: label_map.get(v, v) for v in values}
    if binarize:
        mapped = {v: int(m > 0) for v, m in mapped.items()}
    targets = sorted({0, *mapped.values()})
    index = {t: i for i, t in enumerate(targets)}
    lookup = {v: index[m] for v, m in mapped.items()}
    label_values = []
    for target in targets:
        sources = [v for v, m in mapped.items() if m == target]
        label_values.append(sources[0] if len(sources) == 1 else target)
    return lookup, label_values


def apply_label_lookup(label: np.ndarray, lookup: dict, path: str | os.PathLike) -> np.ndarray:
    """Replace source label values by their classes (``lookup`` keys may be strings, as read back from JSON).

    Raises:
        CaseError: the label holds a value the lookup does not know.
    """
    lookup = {int(k): int(v) for k, v in lookup.items()}
    values = np.unique(label).astype(int)
    unknown = sorted(set(values.tolist()) - set(lookup))
    if unknown:
        raise CaseError(f"{path}: label values {unknown} are not among the dataset's label values {sorted(lookup)}")
    table = np.zeros(
        max(int(values.max(initial=0)), max(lookup)) + 1, dtype=np.uint8 if len(lookup) < 256 else np.int16
    )
    for value, index in lookup.items():
        table[value] = index
    return table[label]


def finalize_source(
    name: str,
    fmt: str,
    channels: dict[str, str],
    cases: list[dict],
    path: str | os.PathLike,
    values: Iterable[int],
    names: dict[int, str] | None,
    options: dict,
) -> DatasetSource:
    """Build a :class:`DatasetSource` whose classes are contiguous; specs get the lookup when it is not identity.

    Raises:
        ValueError: no cases, or two cases sharing an id.
    """
    if not cases:
        raise ValueError(f"{path}: no cases found for format {fmt!r}")
    seen = set()
    for spec in cases:
        check_case_id(spec["id"], path)
        if spec["id"] in seen:
            raise ValueError(f"{path}: case id {spec['id']!r} appears twice; rename one of the sources")
        seen.add(spec["id"])
    names = {int(k): str(v) for k, v in (names or {}).items()}
    names.update({int(k): str(v) for k, v in (options.get("label_names") or {}).items()})
    lookup, label_values = build_label_lookup(values, options.get("label_map"), bool(options.get("binarize")))
    labels = {"0": "background"}
    for k in range(1, len(label_values)):
        sources = [v for v, c in lookup.items() if c == k]
        labels[str(k)] = "+".join(names.get(v, f"label_{v}") for v in sources) if sources else f"label_{k}"
    if any(k != v for k, v in lookup.items()):
        for spec in cases:
            spec["label_lookup"] = {str(k): v for k, v in lookup.items()}
            spec["label_values"] = label_values
    return DatasetSource(name, fmt, labels, channels, cases, str(path), label_values)


def _scan_values(arrays: Iterable[tuple[str, Callable[[], np.ndarray]]], skip_unreadable: bool = True) -> set[int]:
    """Union of the integer values of every label (each read one at a time).

    With ``skip_unreadable`` a label file that cannot be read is passed over: its case fails with the same message
    when it is loaded, and the other cases go on; a label that reads but holds no class map still raises.
    """
    found: set[int] = set()
    for where, read in arrays:
        try:
            array = read()
        except CaseError as error:
            if not skip_unreadable:
                raise
            log.debug("label values of %s not scanned: %s", where, error)
            continue
        found.update(np.unique(as_label_map(array, where)).astype(int).tolist())
    return found


def load_nifti_case(spec: dict, allowed_labels: set[int] | None = None) -> CaseData:
    """Load a case whose image channels and label are NIfTI files (MSD and BraTS layouts)."""
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
    cases = []
    for entry in meta.get("training", []):
        image = entry["image"] if isinstance(entry, dict) else entry
        label = entry.get("label") if isinstance(entry, dict) else None
        cases.append(_msd_spec(root, meta_path, image, label, len(channels)))
    for entry in meta.get("test", []):
        image = entry["image"] if isinstance(entry, dict) else entry
        cases.append(_msd_spec(root, meta_path, image, None, len(channels)))
    if not cases:
        raise ValueError(f"{meta_path}: lists no cases under 'training' or 'test'")
    names = {int(k): v for k, v in labels.items()}
    return finalize_source(meta.get("name", root.name), "msd", channels, cases, root, names, names, options or {})


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


def _pattern_regex(pattern: str) -> re.Pattern:
    """A glob (``*`` and ``?`` wildcards) as a regex whose groups capture what the wildcards matched."""
    parts = []
    for char in pattern:
        parts.append("(.*)" if char == "*" else "(.)" if char == "?" else re.escape(char))
    return re.compile("^" + "".join(parts) + "$", re.IGNORECASE)


_SUFFIX_WORDS = {s.lstrip(".").lower() for s in (*SITK_SUFFIXES, *PNG_SUFFIXES, *HDF5_SUFFIXES)}


def _match_key(regex: re.Pattern, path: Path, root: Path) -> tuple | None:
    """Key that pairs an image with its label: the wildcard captures (suffix captures dropped) and the sub-folder."""
    match = regex.match(path.name)
    if match is None:
        return None
    groups = tuple(g for g in match.groups() if g.lower() not in _SUFFIX_WORDS)
    return (str(path.parent.relative_to(root)), *groups)


def _case_id(path: Path, root: Path, regexes: Sequence[re.Pattern]) -> str:
    """Case id of an image: its name up to the end of the last wildcard (``brain1_image.nrrd`` with ``*_image.nrrd``
    → ``brain1``), prefixed by its sub-folder."""
    stem = strip_suffix(path.name)
    match = next((m for m in (r.match(path.name) for r in regexes) if m), None)
    if match is not None:
        ends = [match.end(i) for i, g in enumerate(match.groups(), 1) if g and g.lower() not in _SUFFIX_WORDS]
        stem = strip_suffix(path.name[: ends[-1]]) if ends else stem
    folder = str(path.parent.relative_to(root))
    return safe_id(stem if folder in ("", ".") else f"{folder.replace(os.sep, '_')}_{stem}")


def _as_list(value) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def _files_with_suffix(root: Path, suffixes: Sequence[str]) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(tuple(suffixes))
    )


def _match_any(regexes: Sequence[re.Pattern], path: Path, root: Path) -> tuple | None:
    for regex in regexes:
        key = _match_key(regex, path, root)
        if key is not None:
            return key
    return None


def _pair_files(
    root: Path, image_pattern: str, label_pattern: str | None, suffixes: Sequence[str], label_root: Path | None = None
) -> list[tuple[tuple, Path, Path | None]]:
    """``(key, image, label or None)`` for every image under ``root`` matching ``image_pattern``.

    Raises:
        ValueError: two images (or labels) give the same key, or no image matches.
    """
    label_root = label_root or root
    image_regexes = [_pattern_regex(p) for p in _as_list(image_pattern)]
    label_regexes = [_pattern_regex(p) for p in _as_list(label_pattern)]
    images, labels = {}, {}
    for path in _files_with_suffix(root, suffixes):
        if label_root == root and any(r.match(path.name) for r in label_regexes):
            continue
        key = _match_any(image_regexes, path, root)
        if key is not None:
            if key in images:
                raise ValueError(f"{path}: pairs with the same key as {images[key]}; make --image-pattern stricter")
            images[key] = path
    for path in _files_with_suffix(label_root, suffixes) if label_regexes else []:
        key = _match_any(label_regexes, path, label_root)
        if key is not None:
            if key in labels:
                raise ValueError(f"{path}: pairs with the same key as {labels[key]}; make --label-pattern stricter")
            labels[key] = path
    if not images:
        raise ValueError(f"{root}: no file matches the image pattern {image_pattern!r}")
    orphans = sorted(str(p) for k, p in labels.items() if k not in images)
    if orphans:
        log.warning("%d label file(s) have no image: %s", len(orphans), ", ".join(orphans[:5]))
    return [(key, path, labels.get(key)) for key, path in sorted(images.items(), key=lambda item: str(item[1]))]


def discover_files(path: str | os.PathLike, options: dict | None = None) -> DatasetSource:
    """Image/label pairs in NRRD, MHA/MHD or NIfTI under a folder, paired by ``image_pattern``/``label_pattern``.

    The text that the wildcards of both patterns match pairs the files (``*_image.nrrd`` with ``*_label.nrrd``);
    files matching the label pattern are never taken as images. A single image file with ``label`` works too.

    Raises:
        FileNotFoundError: ``path`` (or ``label``) does not exist.
        ValueError: no image matches, or two files give the same case id.
    """
    options = options or {}
    root = Path(path)
    if root.is_file():
        label = Path(options["label"]) if options.get("label") else None
        if label is not None and not label.is_file():
            raise FileNotFoundError(f"{label}: label file not found")
        pairs, image_pattern = [((".", strip_suffix(root.name)), root, label)], None
        root = root.parent
    else:
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: input not found")
        image_pattern = options.get("image_pattern") or "*_image.*"
        label_pattern = options.get("label_pattern") or ("*_label.*" if not options.get("image_pattern") else None)
        pairs = _pair_files(root, image_pattern, label_pattern, SITK_SUFFIXES)
    cases = []
    for _key, image, label in pairs:
        case_id = _case_id(image, root, [_pattern_regex(p) for p in _as_list(image_pattern)])
        cases.append(
            {
                "id": case_id,
                "patient": case_id,
                "format": "sitk",
                "image": [str(image.resolve())],
                "label": str(label.resolve()) if label else None,
            }
        )
    _apply_patient_pattern(cases, options.get("patient_pattern"), [Path(c["image"][0]).name for c in cases])
    values = _scan_values((c["label"], _sitk_label_reader(c["label"])) for c in cases if c["label"])
    return finalize_source(root.name, "files", {"0": "image"}, cases, root, values, None, options)


def _sitk_label_reader(path: str) -> Callable[[], np.ndarray]:
    return lambda: sitk_to_array(read_sitk(path), path)[0]


def _apply_patient_pattern(cases: list[dict], pattern: str | None, names: Sequence[str]) -> None:
    """Set each case's ``patient`` from group 1 of ``pattern`` searched in its file name (splits stay per patient)."""
    if not pattern:
        return
    regex = re.compile(pattern)
    for case, name in zip(cases, names, strict=True):
        match = regex.search(name)
        if match is None or not match.groups():
            raise ValueError(f"{name}: the patient pattern {pattern!r} does not match (it needs one group)")
        case["patient"] = safe_id(match.group(1))


def load_sitk_case(spec: dict, allowed_labels: set[int] | None = None) -> CaseData:
    """Load a case whose channels and label are files SimpleITK reads; the label must share the image grid."""
    channels, first = [], None
    for path in spec["image"]:
        source = read_sitk(path)
        data, affine = sitk_to_array(source, path)
        if first is None:
            first = (data.shape, affine, path, source)
        else:
            check_same_grid(first[:2], (data.shape, affine), first[2], path)
        channels.append(check_image(data, path))
    image = np.concatenate(channels, axis=-1)
    label, reference = None, first[3]
    if spec.get("label"):
        reference = read_sitk(spec["label"])
        raw, label_affine = sitk_to_array(reference, spec["label"])
        check_same_grid(first[:2], (raw.shape, label_affine), first[2], spec["label"])
        label = as_label_map(raw, spec["label"], allowed_labels)
    source_path = spec.get("label") or spec["image"][0]
    suffix = next((s for s in SITK_SUFFIXES if source_path.lower().endswith(s)), ".nrrd")
    writer = {
        "kind": "sitk",
        "reference": source_path,
        "extension": {".nhdr": ".nrrd", ".mhd": ".mha"}.get(suffix, suffix),
        "dimension": reference.GetDimension(),
        **sitk_geometry(reference),
    }
    return CaseData(spec["id"], image, label, first[1], writer)


def _hdf5_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in HDF5_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: no HDF5 file (.h5, .hdf5) found")
    return files


def _open_hdf5(path: str | os.PathLike) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise CaseError(f"{path}: file not found")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        truncated = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", str(error))
        if truncated:
            size, expected = truncated.groups()
            raise CaseError(f"{path}: HDF5 file is truncated ({size} of {expected} bytes)") from error
        raise CaseError(f"{path}: cannot open HDF5 file ({error})") from error


def _hdf5_default_keys(handle: h5py.File, path: Path) -> tuple[list[str], str | None]:
    keys = list(handle.keys())
    modality_groups = [k for k in ("ct_data", "pet_data") if k in handle and isinstance(handle[k], h5py.Group)]
    if modality_groups:
        return modality_groups, "label_data" if "label_data" in handle else None
    lowered = {k.lower(): k for k in keys}
    image = next((lowered[k] for k in ("images", "image", "imgs", "x", "data", "volumes") if k in lowered), None)
    label = next((lowered[k] for k in ("labels", "label", "masks", "mask", "y", "seg", "segs") if k in lowered), None)
    if image is None:
        raise ValueError(
            f"{path}: cannot tell the HDF5 layout (top-level keys {keys}); "
            "name the image datasets with --hdf5-image-keys and the label with --hdf5-label-key"
        )
    return [image], label


def _hdf5_layout(handle: h5py.File, key: str, path: Path) -> tuple[str, list[str]]:
    """How ``key`` stores cases: ``("by_modality", patients)`` for ``key/<patient>`` datasets, ``("by_patient",
    patients)`` for ``<patient>/key`` and ``("stacked", [])`` for one dataset holding every sample."""
    if key in handle:
        node = handle[key]
        if isinstance(node, h5py.Group):
            patients = sorted(k for k, v in node.items() if isinstance(v, h5py.Dataset))
            if not patients:
                raise ValueError(f"{path}: group {key!r} holds no datasets")
            return "by_modality", patients
        return "stacked", []
    patients = sorted(k for k, v in handle.items() if isinstance(v, h5py.Group) and key in v)
    if not patients:
        groups = [k for k, v in handle.items() if isinstance(v, h5py.Group)]
        inside = f"; keys in {groups[0]!r}: {list(handle[groups[0]].keys())}" if groups else ""
        raise ValueError(f"{path}: no dataset or group {key!r} (top-level keys: {list(handle.keys())}{inside})")
    return "by_patient", patients


def _hdf5_spacing(handle: h5py.File, key: str, path: Path, flag) -> tuple[list[float], str]:
    if flag is not None:
        return parse_spacing(flag, "--source-spacing"), "flag"
    for node in (handle.get(key), handle):
        if node is None:
            continue
        for attr in ("spacing", "voxel_spacing", "voxel_size", "pixel_spacing", "resolution", "element_size_um"):
            if attr in node.attrs:
                scale = 1e-3 if attr == "element_size_um" else 1.0
                return [v * scale for v in parse_spacing(node.attrs[attr], f"{path}: attribute {attr}")], attr
    match = re.search(r"(\d+(?:\.\d+)?)\s*mm", path.name)
    if match:
        return parse_spacing(float(match.group(1)), str(path)), "file name"
    log.warning("%s: no spacing attribute or --hdf5-spacing; assuming 1 mm isotropic", path)
    return [1.0, 1.0, 1.0], "default"


def _channel_name(key: str) -> str:
    base = key.strip("/").split("/")[-1].lower()
    for prefix, name in (("ct", "CT"), ("pet", "PET"), ("mr", "MR"), ("t1", "T1"), ("t2", "T2")):
        if base.startswith(prefix):
            return name
    return key.strip("/").split("/")[-1]


def discover_hdf5(path: str | os.PathLike, options: dict | None = None) -> DatasetSource:
    """Cases in one HDF5 file or a folder of them.

    Layouts (the image keys decide; the label key must follow the same layout):

    - ``by_modality``: a group per modality holding one ``(Z, Y, X)`` dataset per patient (``ct_data/STS_002``),
      the Kaggle soft-tissue-sarcoma layout, found without flags (``ct_data`` [+ ``pet_data``], ``label_data``).
    - ``by_patient``: a group per patient holding one dataset per key (``STS_002/ct``).
    - ``stacked``: one dataset holding ``N`` samples (``images`` ``(N, 1, 48, 48)``); each sample is a case. A sample
      ``(H, W)``, ``(1, H, W)`` or ``(H, W, 1)`` is one slice; ``(D, H, W)`` (or with a singleton channel) a volume.

    Spacing comes from ``source_spacing``, else from an attribute (``spacing``, ``voxel_size``, ...), else from a
    ``<number>mm`` in the file name, else 1 mm. HDF5 holds no orientation: arrays are used as stored.

    In a folder of several files, a file that cannot be opened or lacks the keys becomes one case that fails with
    that message when loaded (:func:`unreadable_spec`), so the other files' cases are still prepared.

    Raises:
        ValueError: an unknown layout or inconsistent keys (of the only file).
    """
    options = options or {}
    root = Path(path)
    files = _hdf5_files(root)
    cases, channel_names = [], None
    for file in files:
        try:
            file_cases, names = _discover_hdf5_file(file, options, prefix=len(files) > 1)
        except ValueError as error:  # unreadable, or without the keys: that file's case fails, the others go on
            if len(files) == 1:
                raise
            cases.append(unreadable_spec(file, "hdf5", str(error)))
            continue
        if channel_names is not None and names != channel_names:
            raise ValueError(f"{file}: channels {names} differ from the other files' {channel_names}")
        channel_names = names
        cases.extend(file_cases)
    _apply_patient_pattern(cases, options.get("patient_pattern"), [c["id"] for c in cases])
    values = _scan_values(
        (f"{c['image'][0]}:{c['hdf5']['label']}", _hdf5_label_reader(c))
        for c in cases
        if c.get("hdf5", {}).get("label")
    )
    if channel_names is None:
        raise ValueError(f"{root}: no HDF5 file could be read ({cases[0]['error']}, ...)")
    channels = {str(i): n for i, n in enumerate(channel_names)}
    return finalize_source(strip_suffix(root.name), "hdf5", channels, cases, root, values, None, options)


def _discover_hdf5_file(file: Path, options: dict, prefix: bool) -> tuple[list[dict], list[str]]:
    with _open_hdf5(file) as handle:
        image_keys = list(options.get("hdf5_image_keys") or [])
        label_key = options.get("hdf5_label_key")
        if not image_keys:
            image_keys, default_label = _hdf5_default_keys(handle, file)
            label_key = label_key or default_label
        layouts = [_hdf5_layout(handle, key, file) for key in image_keys]
        kind = layouts[0][0]
        if any(layout[0] != kind for layout in layouts):
            raise ValueError(f"{file}: image keys {image_keys} do not share one layout ({[x[0] for x in layouts]})")
        if label_key is not None:
            label_kind, label_patients = _hdf5_layout(handle, label_key, file)
            if label_kind != kind:
                raise ValueError(f"{file}: label key {label_key!r} is {label_kind}, image keys are {kind}")
        spacing, spacing_from = _hdf5_spacing(handle, image_keys[0], file, options.get("source_spacing"))
        stem = safe_id(strip_suffix(file.name))
        cases = []
        if kind == "stacked":
            count = handle[image_keys[0]].shape[0]
            for key in [*image_keys[1:], *([label_key] if label_key else [])]:
                if handle[key].shape[0] != count:
                    raise ValueError(f"{file}: {key!r} holds {handle[key].shape[0]} samples, {image_keys[0]!r} {count}")
            width = max(4, len(str(count - 1)))
            for index in range(count):
                case_id = f"{stem}_{index:0{width}d}"
                cases.append(_hdf5_spec(file, case_id, image_keys, label_key, index, spacing, spacing_from))
        else:
            patients = sorted(set().union(*(set(p) for _, p in layouts)))
            for patient in patients:
                if kind == "by_modality":
                    paths = [f"{key}/{patient}" for key in image_keys]
                    label = f"{label_key}/{patient}" if label_key and patient in label_patients else None
                else:
                    paths = [f"{patient}/{key}" for key in image_keys]
                    label = f"{patient}/{label_key}" if label_key and patient in label_patients else None
                case_id = safe_id(f"{stem}_{patient}" if prefix else patient)
                spec = _hdf5_spec(file, case_id, paths, label, None, spacing, spacing_from)
                spec["patient"] = safe_id(patient)
                cases.append(spec)
    return cases, [_channel_name(k) for k in image_keys]


def unreadable_spec(file: Path, fmt: str, error: str) -> dict:
    """A case for a source file that discovery could not read: :func:`load_case` raises ``error`` for it."""
    case_id = safe_id(strip_suffix(file.name))
    return {"id": case_id, "patient": case_id, "format": fmt, "image": [str(file.resolve())], "label": None,
            "error": error}  # fmt: skip


def _hdf5_spec(file: Path, case_id: str, images: list, label: str | None, index, spacing, spacing_from) -> dict:
    return {
        "id": case_id,
        "patient": case_id,
        "format": "hdf5",
        "image": [str(file.resolve())],
        "label": str(file.resolve()) if label else None,
        "hdf5": {"image": list(images), "label": label, "index": index},
        "spacing": spacing,
        "spacing_from": spacing_from,
    }


def _hdf5_label_reader(spec: dict) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        with _open_hdf5(spec["image"][0]) as handle:
            return _hdf5_volume(handle, spec["hdf5"]["label"], spec["hdf5"]["index"], spec["image"][0])[0]

    return read


def _hdf5_volume(handle: h5py.File, key: str, index: int | None, path: str) -> tuple[np.ndarray, list[int]]:
    """``(Z, Y, X)`` array of dataset ``key`` (sample ``index`` when stacked) and the shape it was stored in."""
    if key not in handle:
        raise CaseError(f"{path}: dataset {key!r} not found")
    node = handle[key]
    if not isinstance(node, h5py.Dataset):
        raise CaseError(f"{path}: {key!r} is a group, not a dataset")
    try:
        data = node[index] if index is not None else node[()]
    except (OSError, ValueError, TypeError) as error:  # a damaged chunk, or a type numpy cannot hold
        raise CaseError(f"{path}: cannot read dataset {key!r} ({error})") from error
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
        raise CaseError(f"{path}: dataset {key!r} holds {data.dtype} values, not numbers")
    stored = list(data.shape)
    squeezed = data
    if squeezed.ndim == 4 and 1 in (squeezed.shape[0], squeezed.shape[-1]):
        squeezed = squeezed[0] if squeezed.shape[0] == 1 else squeezed[..., 0]
    if squeezed.ndim == 3 and squeezed.shape[-1] == 1 and squeezed.shape[0] != 1:
        squeezed = np.moveaxis(squeezed, -1, 0)
    if squeezed.ndim == 2:
        squeezed = squeezed[None]
    if squeezed.ndim != 3:
        where = f"{key}[{index}]" if index is not None else key
        raise CaseError(f"{path}: {where} has shape {tuple(stored)}; expected (Z, Y, X) or a 2D slice")
    return squeezed, stored


def load_hdf5_case(spec: dict, allowed_labels: set[int] | None = None) -> CaseData:
    """Load one HDF5 case: each image key is a channel; spacing from the spec; arrays kept as stored."""
    path, keys, index = spec["image"][0], spec["hdf5"], spec["hdf5"]["index"]
    with _open_hdf5(path) as handle:
        channels, shape = [], None
        for key in keys["image"]:
            data, _ = _hdf5_volume(handle, key, index, path)
            if shape is not None and data.shape != shape:
                raise CaseError(f"{path}: {key!r} has shape {data.shape}, {keys['image'][0]!r} has {shape}")
            shape = data.shape
            channels.append(check_image(data, f"{path}:{key}"))
        label, stored, dtype = None, list(shape), "uint8"
        if keys["label"]:
            raw, stored = _hdf5_volume(handle, keys["label"], index, path)
            if raw.shape != shape:
                raise CaseError(f"{path}: label {keys['label']!r} has shape {raw.shape}, the image {shape}")
            label, dtype = as_label_map(raw, f"{path}:{keys['label']}", allowed_labels), str(raw.dtype)
    writer = {
        "kind": "hdf5",
        "reference": path,
        "key": keys["label"] or ("labels" if index is not None else f"label_data/{spec.get('patient', spec['id'])}"),
        "shape": stored if index is None else [1, *stored],
        "dtype": dtype,
    }
    return CaseData(spec["id"], np.concatenate(channels, axis=-1), label, axis_aligned_affine(spec["spacing"]), writer)


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

    Raises:
        FileNotFoundError: a case folder lacks one of the four modalities.
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
        modalities, seg, _ = BRATS_MODALITIES[release]
        missing = [m for m in modalities if m not in files]
        if missing:
            raise FileNotFoundError(f"{folder}: BraTS case lacks the {', '.join(missing)} image(s)")
        releases.add(release)
        case_id = safe_id(folder.name)
        cases.append(
            {
                "id": case_id,
                "patient": case_id,
                "format": "nifti",
                "image": [str(files[m].resolve()) for m in modalities],
                "label": str(files[seg].resolve()) if seg in files else None,
            }
        )
    if not cases:
        raise ValueError(f"{root}: no BraTS case folder (<case>/<case>_flair.nii.gz ...) found")
    if len(releases) > 1:
        raise ValueError(f"{root}: mixes BraTS 2018-2021 and 2023 file names; convert one set first")
    release = releases.pop()
    modalities, _, names = BRATS_MODALITIES[release]
    channels = {str(i): m.upper() for i, m in enumerate(modalities)}
    return finalize_source(root.name, "brats", channels, cases, root, names, names, options)


_DICOM_TAGS = (
    "Modality",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "FrameOfReferenceUID",
    "PatientID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "InstanceNumber",
    "SeriesNumber",
    "SeriesDescription",
    "Rows",
    "Columns",
)
_LABEL_MODALITIES = ("SEG", "RTSTRUCT")
_NON_IMAGE_MODALITIES = ("SEG", "RTSTRUCT", "SR", "PR", "KO", "RTPLAN", "RTDOSE", "REG", "DOC")


def _read_dicom_header(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_DICOM_TAGS))
    except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError, EOFError):
        return None


def _slice_layout(header) -> str:
    """Size and orientation of a slice, in words: the slices of one acquisition share them."""
    orientation = header.get("ImageOrientationPatient")
    if orientation is not None and len(orientation) == 6:
        cosines = np.asarray(orientation, float)
        plane = ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(np.cross(cosines[:3], cosines[3:]))))]
        plane += f" {(np.round(cosines, 2) + 0.0).tolist()}"  # + 0.0 turns -0.0 into 0.0
    else:
        plane = "no orientation"
    return f"{header.get('Rows', '?')}x{header.get('Columns', '?')} {plane}"


def _damaged_dicom(path: Path, header) -> bool:
    """A file that starts like DICOM but whose data set (read without error) lacks the Modality that every image
    has: its content is garbage after the preamble. A DICOMDIR (media storage directory) has no Modality either."""
    media_class = str(getattr(header, "file_meta", {}).get("MediaStorageSOPClassUID", ""))
    return _looks_like_dicom(path) and media_class != "1.2.840.10008.1.3.10"


def _slice_position(header) -> float | None:
    position, orientation = header.get("ImagePositionPatient"), header.get("ImageOrientationPatient")
    if position is None or orientation is None:
        return None
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    return float(np.dot(normal, np.asarray(position, float)))


def scan_dicom(root: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """Group the DICOM files under ``root`` into image series and label objects (SEG, RTSTRUCT).

    Returns:
        ``(series, label_objects)``: each series ``{"uid", "files" (sorted by position along the slice normal),
        "folder", "modality", "patient", "frame", "number", "description"}``, plus ``"unreadable"`` when its folder
        holds files that cannot be parsed as DICOM (those starting with the DICOM preamble are damaged slices); each
        label object ``{"path", "modality", "frame", "series_uid"}`` where ``series_uid`` is the series it refers to,
        if it says.
    """
    root = Path(root)
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    groups: dict[str, dict] = {}
    label_objects = []
    unreadable: dict[str, list[str]] = {}
    for path in paths:
        if path.name.lower().endswith(NOT_DICOM_SUFFIXES) or path.name.startswith("."):
            continue
        header = _read_dicom_header(path)
        if header is None or ("Modality" not in header and _damaged_dicom(path, header)):
            unreadable.setdefault(str(path.parent), []).append(str(path.resolve()))
            continue
        if "Modality" not in header:
            continue
        modality = str(header.Modality).upper()
        if modality in _LABEL_MODALITIES:
            label_objects.append(_label_object(path, modality))
            continue
        if modality in _NON_IMAGE_MODALITIES:
            continue
        uid = str(header.get("SeriesInstanceUID") or "") or f"folder:{path.parent}"
        group = groups.setdefault(
            uid,
            {
                "uid": uid,
                "files": [],
                "folder": str(path.parent),
                "modality": modality,
                "patient": str(header.get("PatientID") or ""),
                "frame": str(header.get("FrameOfReferenceUID") or ""),
                "number": str(header.get("SeriesNumber") or ""),
                "description": str(header.get("SeriesDescription") or ""),
            },
        )
        position = _slice_position(header)
        order = position if position is not None else float(header.get("InstanceNumber") or 0)
        group["files"].append((order, str(path.resolve())))
        group.setdefault("layouts", {}).setdefault(_slice_layout(header), []).append(path.name)
    series = []
    for group in groups.values():
        group["files"] = [f for _, f in sorted(group["files"])]
        layouts = group.pop("layouts")
        if len(layouts) > 1:
            group["mixed"] = "; ".join(f"{len(v)} x {k} (e.g. {v[0]})" for k, v in layouts.items())
        if group["folder"] in unreadable:
            group["unreadable"] = unreadable[group["folder"]]
        series.append(group)
    return sorted(series, key=lambda s: (s["folder"], s["number"], s["uid"])), label_objects


def _label_object(path: Path, modality: str) -> dict:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    referenced = None
    if modality == "SEG" and "ReferencedSeriesSequence" in ds:
        referenced = str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
    if modality == "RTSTRUCT":
        for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
            for study in frame.get("RTReferencedStudySequence", []):
                for series in study.get("RTReferencedSeriesSequence", []):
                    referenced = str(series.SeriesInstanceUID)
    if modality == "SEG":
        names = {
            int(s.SegmentNumber): str(s.get("SegmentLabel", f"segment_{s.SegmentNumber}")) for s in ds.SegmentSequence
        }
    else:
        names = {int(r.ROINumber): str(r.ROIName) for r in ds.get("StructureSetROISequence", [])}
    frame = str(ds.get("FrameOfReferenceUID") or "")
    if not frame and modality == "RTSTRUCT" and ds.get("ReferencedFrameOfReferenceSequence"):
        frame = str(ds.ReferencedFrameOfReferenceSequence[0].get("FrameOfReferenceUID") or "")
    return {"path": str(path.resolve()), "modality": modality, "frame": frame, "series_uid": referenced, "names": names}


def _match_label_object(series: dict, objects: list[dict], single: bool) -> dict | None:
    for rule in ("series_uid", "frame"):
        key = "uid" if rule == "series_uid" else "frame"
        matches = [o for o in objects if o.get(rule) and o.get(rule) == series[key]]
        if matches:
            if len(matches) > 1:
                log.warning("%s: %d label objects refer to it; using %s", series["folder"], len(matches), matches[0])
            return matches[0]
    return objects[0] if single and len(objects) == 1 else None


def discover_dicom(path: str | os.PathLike, options: dict | None = None) -> DatasetSource:
    """Every DICOM image series under a folder becomes a case.

    Labels: ``label`` (a NIfTI/NRRD/MHA file in the same physical space, a DICOM-SEG or an RTSTRUCT file) for a
    single series, or the SEG/RTSTRUCT objects found beside the series (matched by referenced series, then frame of
    reference). Label files are resampled onto the series grid with nearest neighbour, whatever their axis order.
    RTSTRUCT ROIs become classes in order of first appearance (later ROIs win where contours overlap).

    Raises:
        FileNotFoundError: ``path`` or ``label`` does not exist.
        ValueError: no image series, or ``label`` given with several series.
    """
    options = options or {}
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: input not found")
    series, objects = scan_dicom(root)
    if not series:
        raise ValueError(f"{root}: no DICOM image series found")
    label_option = options.get("label")
    if label_option:
        label_path = Path(label_option)
        if not label_path.is_file():
            raise FileNotFoundError(f"{label_path}: label file not found")
        if len(series) > 1:
            raise ValueError(
                f"{root}: holds {len(series)} series; --label fits one series only (put DICOM-SEG or RTSTRUCT "
                "objects beside the series instead, or point --input at one series folder)"
            )
        header = _read_dicom_header(label_path)
        if header is not None and str(header.get("Modality", "")).upper() in _LABEL_MODALITIES:
            objects = [_label_object(label_path, str(header.Modality).upper())]
        else:
            objects = [{"path": str(label_path.resolve()), "modality": "FILE", "names": {}}]
    cases, values, names, roi_values = [], set(), {}, {}
    used_ids = set()
    for item in series:
        found = _match_label_object(item, objects, single=len(series) == 1)
        spec = _dicom_spec(root, item, found, used_ids, len(series) == 1)
        if found is not None and found["modality"] == "FILE":
            values |= _scan_values([(found["path"], _sitk_label_reader(found["path"]))])
        elif found is not None and found["modality"] == "SEG":
            values |= set(found["names"])
            names.update(found["names"])
        elif found is not None:
            spec["rtstruct_rois"] = {}
            for name in found["names"].values():
                value = roi_values.setdefault(name, len(roi_values) + 1)
                spec["rtstruct_rois"][name] = value
                names[value] = name
            values |= set(spec["rtstruct_rois"].values())
        cases.append(spec)
    modalities = [s["modality"] for s in series]
    channels = {"0": max(set(modalities), key=modalities.count)}
    source = finalize_source(
        root.name if root.is_dir() else root.parent.name, "dicom", channels, cases, root, values, names, options
    )
    for spec in source.cases:
        spec["label_names"] = source.labels
    return source


def _dicom_spec(root: Path, series: dict, label: dict | None, used_ids: set, single: bool) -> dict:
    folder = Path(series["folder"])
    base = root.name if single and root.is_dir() else (str(folder.relative_to(root)) if root.is_dir() else folder.name)
    if base in ("", "."):
        base = root.name
    case_id = safe_id(base)
    if case_id in used_ids:
        case_id = safe_id(f"{base}_{series['number'] or len(used_ids)}")
    while case_id in used_ids:
        case_id = safe_id(f"{case_id}_{len(used_ids)}")
    used_ids.add(case_id)
    return {
        "id": case_id,
        "patient": safe_id(series["patient"]) if series["patient"] else case_id,
        "format": "dicom",
        "image": series["files"],
        "label": label["path"] if label else None,
        "label_kind": label["modality"].lower() if label else None,
        "modality": series["modality"],
        "series_uid": series["uid"],
        "frame_of_reference": series["frame"],
        **({"unreadable": series["unreadable"]} if series.get("unreadable") else {}),
        **({"mixed": series["mixed"]} if series.get("mixed") else {}),
    }


def read_dicom_series(files: Sequence[str], where: str, unreadable: Sequence[str] = ()) -> sitk.Image:
    """Read a sorted list of DICOM slices with SimpleITK (rescale slope/intercept applied: CT in HU).

    Args:
        files: the slices, sorted along the slice normal.
        where: the series' folder, for messages.
        unreadable: files beside the series that could not be parsed as DICOM. Any that starts with the DICOM
            preamble is a damaged slice, and the series is refused rather than read with a slice missing; the others
            are named when the slices turn out unevenly spaced.

    Raises:
        CaseError: a damaged or unreadable slice (named), or slices unevenly spaced or repeated.
    """
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise CaseError(f"{where}: DICOM file {missing[0]} not found")
    damaged = [f for f in unreadable if _looks_like_dicom(Path(f))]
    if damaged:
        raise CaseError(f"{damaged[0]}: damaged DICOM file among the slices in {where} ({_dicom_problem(damaged[0])})")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    reader.MetaDataDictionaryArrayUpdateOn()
    warnings_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's own warning on uneven slices; the check below names it
    try:
        image = reader.Execute()
    except RuntimeError as error:
        culprit = _unreadable_slice(files)
        if culprit is not None:
            raise CaseError(
                f"{culprit}: damaged DICOM slice of the series in {where} ({_dicom_problem(culprit)})"
            ) from error
        raise CaseError(f"{where}: cannot read the DICOM series ({_itk_reason(error)})") from error
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_shown)
    if len(files) > 2:
        direction = np.asarray(image.GetDirection()).reshape(3, 3)
        positions = []
        for i in range(len(files)):
            if reader.HasMetaDataKey(i, "0020|0032"):
                point = [float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")]
                positions.append(float(np.dot(direction[:, 2], point)))
        steps = np.diff(positions)
        if (
            len(positions) == len(files)
            and steps.size
            and (np.any(np.abs(steps) < 1e-4) or np.ptp(steps) > 0.01 * max(abs(float(np.median(steps))), 1e-3))
        ):
            others = f"; the folder also holds files that are not readable DICOM: {', '.join(unreadable)}"
            raise CaseError(
                f"{where}: slices are repeated or unevenly spaced (steps {np.round(np.unique(np.round(steps, 3)), 3)} "
                f"mm); the series may miss slices or mix acquisitions{others if unreadable else ''}"
            )
    return image


def _unreadable_slice(files: Sequence[str]) -> str | None:
    """The first file of a series that SimpleITK cannot read on its own (after the series failed to read)."""
    for file in files:
        try:
            sitk.ReadImage(file)
        except RuntimeError:
            return file
    return None


def _dicom_problem(path: str) -> str:
    """What is wrong with a damaged DICOM file, in a few words."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the very damage reported here
            if "Modality" not in pydicom.dcmread(path, stop_before_pixels=True):
                return "its content after the DICOM preamble is not a readable data set"
            dataset = pydicom.dcmread(path)
            if not any(k in dataset for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
                return "its pixel data is missing or cut short: the file is truncated"
            dataset.pixel_array  # noqa: B018  (decoding is the check)
    except Exception as error:  # pydicom raises many types for damaged files
        lines = str(error).strip().splitlines()
        return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return "its pixel data cannot be decoded"


def resample_label_onto(label: sitk.Image, reference: sitk.Image, path: str | os.PathLike) -> np.ndarray:
    """Nearest-neighbour resampling of a label image onto ``reference``'s grid (any axis order or flips).

    Raises:
        CaseError: the label is not a scalar image or does not overlap the reference in physical space.
    """
    if label.GetNumberOfComponentsPerPixel() != 1 or label.GetDimension() != 3:
        raise CaseError(f"{path}: a label must be a scalar 3D image")
    if not _overlaps(label, reference):
        raise CaseError(f"{path}: the label does not overlap the image in physical space (another frame of reference?)")
    resampled = sitk.Resample(label, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())
    return sitk.GetArrayFromImage(resampled)


def _corners(image: sitk.Image) -> np.ndarray:
    size = image.GetSize()
    points = [[i, j, k] for i in (-0.5, size[0] - 0.5) for j in (-0.5, size[1] - 0.5) for k in (-0.5, size[2] - 0.5)]
    return np.array([image.TransformContinuousIndexToPhysicalPoint(p) for p in points])


def _overlaps(first: sitk.Image, second: sitk.Image) -> bool:
    a, b = _corners(first), _corners(second)
    return bool(np.all(a.min(0) < b.max(0)) and np.all(b.min(0) < a.max(0)))


def _read_dicom_seg(path: str, reference: sitk.Image, frame: str) -> np.ndarray:
    import highdicom as hd

    try:
        seg = hd.seg.segread(path)
        volume = seg.get_volume(combine_segments=True)
    except Exception as error:  # highdicom raises ValueError, RuntimeError, KeyError on unusual objects
        raise CaseError(f"{path}: cannot read the DICOM-SEG ({type(error).__name__}: {error})") from error
    seg_frame = str(seg.get("FrameOfReferenceUID") or "")
    if frame and seg_frame and frame != seg_frame:
        raise CaseError(f"{path}: the DICOM-SEG's frame of reference {seg_frame} is not the series' {frame}")
    array = np.ascontiguousarray(volume.array)
    image = sitk.GetImageFromArray(array.astype(np.int16 if array.max(initial=0) > 255 else np.uint8))
    affine = np.asarray(volume.affine, dtype=float)  # (slice, row, column) index -> LPS mm
    # SimpleITK's x, y, z index = (column, row, slice): reverse the columns of the affine.
    matrix = affine[:3, 2::-1]
    spacing = np.linalg.norm(matrix, axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((matrix / spacing).ravel().tolist())
    image.SetOrigin(affine[:3, 3].tolist())
    return resample_label_onto(image, reference, path)


def rasterize_rtstruct(path: str | os.PathLike, reference: sitk.Image, roi_values: dict[str, int]) -> np.ndarray:
    """Fill the closed planar contours of an RTSTRUCT on ``reference``'s grid, ``(Z, Y, X)``.

    Each ROI named in ``roi_values`` gets its value (later ROIs overwrite earlier ones where they overlap); nested
    contours on one slice toggle (holes). Contour points are mapped to continuous voxel indices; a pixel belongs to a
    contour when its centre lies inside it.

    Raises:
        CaseError: unreadable file or contours that lie off the series.
    """
    import pydicom
    from skimage.draw import polygon

    try:
        ds = pydicom.dcmread(str(path))
    except Exception as error:
        raise CaseError(f"{path}: cannot read the RTSTRUCT ({type(error).__name__}: {error})") from error
    size = reference.GetSize()
    shape = (size[2], size[1], size[0])
    matrix = np.asarray(reference.GetDirection()).reshape(3, 3) @ np.diag(reference.GetSpacing())
    inverse, origin = np.linalg.inv(matrix), np.asarray(reference.GetOrigin())
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.get("StructureSetROISequence", [])}
    label = np.zeros(shape, dtype=np.uint8 if max(roi_values.values(), default=0) < 256 else np.int16)
    off_grid = 0
    for roi in ds.get("ROIContourSequence", []):
        value = roi_values.get(names.get(int(roi.ReferencedROINumber), ""))
        if value is None:
            continue
        mask = np.zeros(shape, dtype=bool)
        for contour in roi.get("ContourSequence", []):
            if str(contour.get("ContourGeometricType", "CLOSED_PLANAR")) != "CLOSED_PLANAR":
                continue
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            index = (inverse @ (points - origin).T).T  # continuous (x, y, z) index
            z = int(np.rint(np.median(index[:, 2])))
            if not 0 <= z < shape[0]:
                off_grid += 1
                continue
            rows, cols = polygon(index[:, 1], index[:, 0], shape=shape[1:])
            plane = np.zeros(shape[1:], dtype=bool)
            plane[rows, cols] = True
            mask[z] ^= plane
        label[mask] = value
    if off_grid:
        log.warning("%s: %d contour(s) lie outside the series and were skipped", path, off_grid)
    return label


def load_dicom_case(spec: dict, allowed_labels: set[int] | None = None) -> CaseData:
    """Load a DICOM series (HU for CT) and its label resampled onto the series grid."""
    where = str(Path(spec["image"][0]).parent)
    if spec.get("mixed"):
        raise CaseError(
            f"{where}: series {spec.get('series_uid')} mixes slices of different sizes or orientations "
            f"({spec['mixed']}): more than one acquisition under one series UID; separate them into folders "
            "with their own series"
        )
    image = read_dicom_series(spec["image"], where, spec.get("unreadable", ()))
    if spec.get("unreadable"):
        log.warning("%s: left out file(s) that are not readable DICOM: %s", where, ", ".join(spec["unreadable"]))
    array, affine = sitk_to_array(image, where)
    label = None
    if spec.get("label"):
        kind = spec.get("label_kind") or "file"
        if kind == "seg":
            raw = _read_dicom_seg(spec["label"], image, spec.get("frame_of_reference", ""))
        elif kind == "rtstruct":
            raw = rasterize_rtstruct(spec["label"], image, spec.get("rtstruct_rois", {}))
        else:
            raw = resample_label_onto(read_sitk(spec["label"]), image, spec["label"])
        label = as_label_map(raw, spec["label"], allowed_labels)
    writer = {
        "kind": "dicom",
        "files": list(spec["image"]),
        "labels": spec.get("label_names", {}),
        **sitk_geometry(image),
    }
    return CaseData(spec["id"], check_image(array, where), label, affine, writer)


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

    Raises:
        FileNotFoundError: a folder is missing.
        ValueError: no image, a pattern that does not match, or a slice listed twice.
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
    cases = _group_png(pairs, options.get("patient_pattern"), parse_spacing(options.get("source_spacing"), "spacing"))
    first = read_2d(cases[0]["image"][0])
    channels = (
        {"0": "image"}
        if first.shape[-1] == 1
        else {str(c): "RGB"[c] if c < 3 else f"c{c}" for c in range(first.shape[-1])}
    )
    for spec in cases:
        spec["channels"] = len(channels)
    values = _scan_values(
        ((m, lambda m=m: read_2d(m, mask=True)[None]) for c in cases for m in c["masks"] if m), skip_unreadable=False
    )
    return finalize_source(root.name, "png", channels, cases, root, values, None, options)


def _group_png(pairs: list, pattern: str | None, spacing: list | None) -> list[dict]:
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
        orders = [m[0] for m in members]
        if len(set(orders)) != len(orders):
            raise ValueError(f"{members[0][1]}: slice numbers repeat within {case_id!r}; check --patient-pattern")
        masks = [str(m.resolve()) if m else None for _, _, m in members]
        if any(masks) and not all(masks):
            missing = next(str(i) for _, i, m in members if m is None)
            raise ValueError(f"{missing}: has no mask while other slices of {case_id!r} have one")
        cases.append(
            {
                "id": case_id,
                "patient": patients[case_id],
                "format": "png",
                "image": [str(i.resolve()) for _, i, _ in members],
                "label": masks[0],
                "masks": masks if any(masks) else [],
                "spacing": spacing or [1.0, 1.0, 1.0],
            }
        )
    return cases


def load_png_case(spec: dict, allowed_labels: set[int] | None = None) -> CaseData:
    """Stack a case's 2D slices into ``(Z, H, W, C)`` (and masks into ``(Z, H, W)``)."""
    slices = [read_2d(p) for p in spec["image"]]
    for path, array in zip(spec["image"], slices, strict=True):
        if array.shape != slices[0].shape:
            raise CaseError(f"{path}: size {array.shape} differs from {spec['image'][0]} {slices[0].shape}")
    image = np.stack(slices)
    if image.shape[-1] != spec.get("channels", image.shape[-1]):
        raise CaseError(f"{spec['image'][0]}: {image.shape[-1]} channels, the dataset has {spec['channels']}")
    label = None
    if spec.get("masks"):
        masks = []
        for mask_path, image_path in zip(spec["masks"], spec["image"], strict=True):
            mask = read_2d(mask_path, mask=True)
            if mask.shape != image.shape[1:3]:
                raise CaseError(
                    f"{mask_path}: size {mask.shape} differs from its image {image_path} {image.shape[1:3]}"
                )
            masks.append(mask)
        label = as_label_map(np.stack(masks), spec["masks"][0], allowed_labels)
    names = [Path(p).name for p in (spec.get("masks") or spec["image"])]
    writer = {"kind": "png", "files": [strip_suffix(n) + ".png" for n in names]}
    return CaseData(
        spec["id"], check_image(image, spec["image"][0]), label, axis_aligned_affine(spec["spacing"]), writer
    )


DISCOVERERS: dict[str, Callable[..., DatasetSource]] = {
    "msd": discover_msd,
    "files": discover_files,
    "hdf5": discover_hdf5,
    "brats": discover_brats,
    "dicom": discover_dicom,
    "png": discover_png,
}
LOADERS: dict[str, Callable[..., CaseData]] = {
    "nifti": load_nifti_case,
    "sitk": load_sitk_case,
    "hdf5": load_hdf5_case,
    "dicom": load_dicom_case,
    "png": load_png_case,
}


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


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
        raise ValueError(f"{path}: cannot tell the input format; pass --format ({', '.join(sorted(DISCOVERERS))})")
    if (path / "dataset.json").is_file():
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
    if any(n.endswith(SITK_SUFFIXES) for n in names):
        return "files"
    if any(n.endswith(PNG_SUFFIXES) for n in names):
        return "png"
    raise ValueError(f"{path}: cannot tell the input format; pass --format ({', '.join(sorted(DISCOVERERS))})")


def discover(path: str | os.PathLike, fmt: str = "auto", options: dict | None = None) -> DatasetSource:
    """Find the cases under ``path`` in format ``fmt`` (``auto`` detects it).

    Args:
        path: the input folder or file.
        fmt: a key of :data:`DISCOVERERS` or ``auto``.
        options: reader options: ``label``, ``image_pattern``, ``label_pattern``, ``patient_pattern``,
            ``hdf5_image_keys``, ``hdf5_label_key``, ``source_spacing`` (HDF5, PNG), ``label_map`` ``{source: target}``,
            ``binarize``, ``label_names`` ``{source value: name}``.

    Raises:
        FileNotFoundError: the input (or a file it names) is missing.
        ValueError: unknown format or a layout problem, naming the file.
    """
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in DISCOVERERS:
        raise ValueError(f"unknown input format {fmt!r}; known: auto, {', '.join(sorted(DISCOVERERS))}")
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: input not found")
    return DISCOVERERS[fmt](path, options or {})


def load_case(spec: dict, allowed_labels: set[int] | None = None) -> CaseData:
    """Read one case described by a spec from :func:`discover`; the label comes back as contiguous classes.

    Raises:
        CaseError: the case cannot be read, or its label holds values outside ``allowed_labels``.
        ValueError: no reader for the spec's format.
    """
    if spec.get("error"):
        raise CaseError(spec["error"])
    loader = LOADERS.get(spec.get("format"))
    if loader is None:
        raise ValueError(f"case {spec.get('id')!r}: no reader for format {spec.get('format')!r}")
    case = loader(spec, None)
    if case.label is not None:
        where = spec.get("label") or spec["image"][0]
        if spec.get("label_lookup"):
            case.label = apply_label_lookup(case.label, spec["label_lookup"], where)
        if allowed_labels is not None:
            check_label_values(case.label, allowed_labels, where)
    if spec.get("label_values"):
        case.writer["label_values"] = list(spec["label_values"])
    return case

"""What every format shares: the containers a reader returns, the checks, label remapping and file pairing.

- :class:`CaseError`, :class:`CaseSpec` (one case found: its source files and how to read them, as stored in
  ``manifest.json``), :class:`CaseData` (one loaded case) and :class:`DatasetSource` (what discovery finds);
- the file suffixes of each format, :func:`strip_suffix` and :func:`safe_id` (file names to case ids);
- the checks every loader applies: :func:`as_label_map`, :func:`check_label_values`, :func:`check_image`,
  :func:`check_same_grid`;
- labels: discovery remaps the source's label values to contiguous classes ``0..K-1`` (after the user's
  ``label_map`` and ``binarize``; :func:`build_label_lookup`, :func:`finalize_source`) and keeps the value each class
  had in the source in ``label_values``, so that writers put the source values back (:func:`source_values`; its
  inverse :func:`class_indices`);
- pairing image and label files by glob patterns (:func:`_pair_files`, for ``png``; ``files``: :mod:`.channels`).
"""

from __future__ import annotations

import copy
import logging
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path

import numpy as np

from utils import geometry
from utils.fileio import check_case_id

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SITK_SUFFIXES = (*NIFTI_SUFFIXES, ".nrrd", ".nhdr", ".mha", ".mhd")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
PNG_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NOT_DICOM_SUFFIXES = (*SITK_SUFFIXES, *HDF5_SUFFIXES, *PNG_SUFFIXES, ".json", ".txt", ".md", ".csv", ".py", ".gz")
SOFTWARE = ("keras-medseg", "0.1.0")


class CaseError(ValueError):
    """A case cannot be read or is inconsistent; the message names the file and the problem."""


@dataclass
class CaseData:
    """One case as every reader returns it.

    Attributes:
        case_id: safe identifier, used in output file names.
        image: ``(Z, Y, X, C)`` float32 (or its integer dtype: ``load_case(integers=True)``), channels last, as stored.
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
class Hdf5Keys:
    """Where an HDF5 case lives in its file (:attr:`CaseSpec.hdf5`).

    Attributes:
        image: one dataset path per channel (``ct_data/STS_002``, ``STS_002/ct``, or a stacked ``images``).
        label: the label's dataset path, or ``None`` when unlabelled.
        index: the sample's index in stacked datasets; ``None`` when each dataset holds one case.
    """

    image: list[str]
    label: str | None = None
    index: int | None = None

    def to_json(self) -> dict:
        return {"image": list(self.image), "label": self.label, "index": self.index}

    @classmethod
    def from_json(cls, data: dict, where: str = "hdf5 keys") -> Hdf5Keys:
        """Raises: ValueError: an unknown or missing key, or a value of the wrong type, naming it."""
        return cls(**copy.deepcopy(_fields_from_json(cls, data, where)))


@dataclass(kw_only=True)
class CaseSpec:
    """One case as discovery finds it and :func:`utils.formats.load_case` reads it: the source files and how to read
    them. ``manifest.json`` keeps it per case (:meth:`to_json`; the entry's ``source`` holds all but ``id`` and
    ``patient``); :meth:`from_json` reads it back.

    Every format sets the first five fields; the others stay ``None`` (and out of the JSON) unless the format named in
    brackets, or the label remapping, sets them.

    Attributes:
        id: safe case identifier, used in output file names.
        patient: the patient the case belongs to (splits keep a patient's cases together); the ``id`` when not given.
        format: the kind that loads it (:attr:`utils.formats.Format.kind`: ``nifti``, ``sitk``, ``hdf5``, ``dicom``,
            ``png``).
        image: the source files: one per channel (NIfTI, ITK), one per slice (DICOM, PNG) or the HDF5 file.
        label: the label file (for HDF5 the file itself, for PNG the first mask), or ``None`` when unlabelled.
        error: why discovery refused the case (a missing, unreadable or incomplete source, a path out of the
            dataset folder); :func:`utils.formats.load_case` raises it, so the case fails alone.
        hdf5: (hdf5) the datasets of the case in its file.
        masks: (png) one mask file per slice; ``[]`` when unlabelled.
        spacing: (hdf5, png) voxel size ``[z, y, x]`` in mm, as these files hold none (or only as an attribute).
        spacing_from: (hdf5) where ``spacing`` came from: ``flag``, the attribute's name, ``file name``, ``default``.
        channels: (png) the number of channels every slice must have.
        label_kind: (dicom) ``file``, ``seg`` or ``rtstruct``; ``None`` when unlabelled.
        modality, series_uid, frame_of_reference: (dicom) of the series.
        unreadable: (dicom) files beside the series that are not readable DICOM.
        mixed: (dicom) the slice layouts of a series UID that mixes acquisitions; loading refuses the case.
        rtstruct_rois: (dicom) ``{ROI name: label value}`` of an RTSTRUCT label.
        label_lookup: ``{source value (a string, as in JSON): class}`` when the classes are not the source values.
        label_values: with ``label_lookup``, the source value of each class.
        label_names: (dicom) the dataset's ``{class: name}``, naming the segments of a DICOM-SEG.
    """

    id: str
    patient: str | None = None
    format: str
    image: list[str]
    label: str | None = None
    error: str | None = None
    hdf5: Hdf5Keys | None = None
    masks: list[str] | None = None
    spacing: list[float] | None = None
    spacing_from: str | None = None
    channels: int | None = None
    label_kind: str | None = None
    modality: str | None = None
    series_uid: str | None = None
    frame_of_reference: str | None = None
    unreadable: list[str] | None = None
    mixed: str | None = None
    rtstruct_rois: dict[str, int] | None = None
    label_lookup: dict[str, int] | None = None
    label_values: list[int] | None = None
    label_names: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.patient is None:
            self.patient = self.id

    def source_files(self) -> list[str]:
        """Every file the case is read from (images, label, masks): results made from them are stale once they
        change."""
        return [*self.image, *([self.label] if self.label else []), *(self.masks or [])]

    def to_json(self) -> dict:
        """The plain JSON object, keys in field order. A field at ``None`` is left out, except ``label`` and the
        ``label_kind`` of a DICOM case, which discovery always wrote."""
        out = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if value is None and item.name != "label" and not (item.name == "label_kind" and self.format == "dicom"):
                continue
            out[item.name] = value.to_json() if isinstance(value, Hdf5Keys) else copy.deepcopy(value)
        return out

    @classmethod
    def from_json(cls, data: dict, where: str | None = None) -> CaseSpec:
        """The spec of a JSON object as :meth:`to_json` writes it.

        Args:
            data: the object; ``patient`` and the optional fields may be absent.
            where: what to name in messages (default: the case).

        Raises:
            ValueError: an unknown or missing key, or a value of the wrong type, naming the key.
        """
        where = where or f"case {data.get('id') if isinstance(data, dict) else None!r}"
        values = copy.deepcopy(_fields_from_json(cls, data, where))
        if values.get("hdf5") is not None:
            values["hdf5"] = Hdf5Keys.from_json(values["hdf5"], f"{where}: hdf5")
        return cls(**values)


def _fields_from_json(cls: type, data: dict, where: str) -> dict:
    """``data`` checked against the fields of dataclass ``cls``: every key known, every field without a default
    present, every value of its field's type (a dataclass field takes an object).

    Raises:
        ValueError: naming ``where`` and the key.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {data!r}")
    known = {item.name: item for item in fields(cls)}
    unknown = [key for key in data if key not in known]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (known keys: {', '.join(known)})")
    hints = typing.get_type_hints(cls)
    for name, item in known.items():
        if name not in data:
            if item.default is MISSING and item.default_factory is MISSING:
                raise ValueError(f"{where}: missing key {name!r}")
        elif not _has_type(data[name], hints[name]):
            expected = str(hints[name]).replace(f"{__name__}.", "").replace("<class '", "").replace("'>", "")
            raise ValueError(f"{where}: key {name!r} must be {expected}, got {data[name]!r}")
    return data


def _has_type(value, hint) -> bool:
    """Whether a JSON value fits a type hint (``str``, ``int``, ``float``, ``None``, unions, lists, dicts, a dataclass
    as an object)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _has_type(k, args[0]) and _has_type(v, args[1]) for k, v in value.items()
        )
    if hint is type(None):
        return value is None
    if hint in (int, float):
        return isinstance(value, int if hint is int else int | float) and not isinstance(value, bool)
    if is_dataclass(hint):
        return isinstance(value, dict)
    return isinstance(value, hint)


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
    cases: list[CaseSpec]
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


def as_label_map(label: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """Check that ``label`` holds integer class values (stored as any dtype) and return it as uint8/int16.

    Raises:
        CaseError: non-integer or non-finite values.
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
    dtype = np.uint8 if values.size == 0 or values.max() < 256 else np.int16
    return label.astype(dtype, copy=False)


def check_label_values(values: np.ndarray, allowed: set[int], path: str | os.PathLike) -> None:
    """Refuse label values outside ``allowed``.

    Raises:
        CaseError: naming the file, the unknown values and the allowed ones.
    """
    unknown = sorted(set(np.unique(values).astype(int).tolist()) - set(allowed))
    if unknown:
        raise CaseError(f"{path}: label values {unknown} are not among the dataset's labels {sorted(allowed)}")


def check_image(image: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """Return ``image`` as float32 ``(Z, Y, X, C)`` (integers as stored: ``load_case`` converts), refusing NaN/Inf.

    Raises:
        CaseError: the image holds NaN or Inf voxels or is not 3D.
    """
    if image.ndim == 3:
        image = image[..., None]
    if image.ndim != 4:
        raise CaseError(f"{path}: expected a 3D image, found shape {image.shape}")
    if np.issubdtype(image.dtype, np.integer):  # always finite
        return image
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise CaseError(f"{path}: image holds {int(np.count_nonzero(~np.isfinite(image)))} NaN or Inf voxels")
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
    cases: list[CaseSpec],
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
        check_case_id(spec.id, path)
        if spec.id in seen:
            raise ValueError(f"{path}: case id {spec.id!r} appears twice; rename one of the sources")
        seen.add(spec.id)
    names = {int(k): str(v) for k, v in (names or {}).items()}
    names.update({int(k): str(v) for k, v in (options.get("label_names") or {}).items()})
    lookup, label_values = build_label_lookup(values, options.get("label_map"), bool(options.get("binarize")))
    labels = {"0": "background"}
    for k in range(1, len(label_values)):
        sources = [v for v, c in lookup.items() if c == k]
        labels[str(k)] = "+".join(names.get(v, f"label_{v}") for v in sources) if sources else f"label_{k}"
    if any(k != v for k, v in lookup.items()):
        for spec in cases:
            spec.label_lookup = {str(k): v for k, v in lookup.items()}
            spec.label_values = list(label_values)
    return DatasetSource(name, fmt, labels, channels, cases, str(path), label_values)


def _scan_values(arrays: Iterable[tuple[str, Callable[[], np.ndarray]]]) -> set[int]:
    """Union of the integer values of every label (each read one at a time).

    A label that cannot be read, or that holds no class map, is passed over: its case fails with the same message
    when it is loaded, and the other cases go on.
    """
    found: set[int] = set()
    for where, read in arrays:
        try:
            values = np.unique(as_label_map(read(), where))
        except Exception as error:  # a damaged file can make a reader raise anything; its case fails when loaded
            log.debug("label values of %s not scanned: %s", where, error)
            continue
        found.update(values.astype(int).tolist())
    return found


def unreadable_spec(file: Path, fmt: str, error: str) -> CaseSpec:
    """A case for a source file that discovery could not read: :func:`load_case` raises ``error`` for it."""
    return CaseSpec(id=safe_id(strip_suffix(file.name)), format=fmt, image=[os.path.abspath(file)], error=error)


def inside_dataset(path: str | os.PathLike, root: str | os.PathLike, listed: str | None = None) -> Path:
    """``path`` resolved, refused when it lies outside the dataset folder ``root`` (through ``..`` or a symbolic
    link). Discovery checks every source file before anything opens it; ``listed`` names the file in the message.

    Raises:
        CaseError: ``... escapes the dataset folder ROOT``.
    """
    base, resolved = Path(root).resolve(), Path(path).resolve()
    if resolved != base and base not in resolved.parents:
        raise CaseError(f"{listed or path}: escapes the dataset folder {base} (through '..' or a symbolic link) and "
                        "is not read; copy the file into the folder")  # fmt: skip
    return resolved


def _pattern_regex(pattern: str) -> re.Pattern:
    """A glob (``*`` and ``?`` wildcards) as a regex whose groups capture what the wildcards matched."""
    parts = []
    for char in pattern:
        parts.append("(.*)" if char == "*" else "(.)" if char == "?" else re.escape(char))
    return re.compile("^" + "".join(parts) + "$", re.IGNORECASE)


_SUFFIX_WORDS = {s.lstrip(".").lower() for s in (*SITK_SUFFIXES, *PNG_SUFFIXES, *HDF5_SUFFIXES)}


def _match_key(regexes: Sequence[re.Pattern], path: Path, root: Path) -> tuple | None:
    """Key that pairs an image with its label: the wildcard captures of the first pattern that matches (suffix
    captures dropped) and the sub-folder; ``None`` when no pattern matches."""
    match = next((m for m in (regex.match(path.name) for regex in regexes) if m is not None), None)
    if match is None:
        return None
    groups = tuple(g for g in match.groups() if g.lower() not in _SUFFIX_WORDS)
    return (str(path.parent.relative_to(root)), *groups)


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
        key = _match_key(image_regexes, path, root)
        if key is not None:
            if key in images:
                raise ValueError(f"{path}: pairs with the same key as {images[key]}; make --image-pattern stricter")
            images[key] = path
    for path in _files_with_suffix(label_root, suffixes) if label_regexes else []:
        key = _match_key(label_regexes, path, label_root)
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


def _apply_patient_pattern(cases: list[CaseSpec], pattern: str | None, names: Sequence[str]) -> None:
    """Set each case's ``patient`` from group 1 of ``pattern`` searched in its file name (splits stay per patient)."""
    if not pattern:
        return
    regex = re.compile(pattern)
    for case, name in zip(cases, names, strict=True):
        match = regex.search(name)
        if match is None or not match.groups():
            raise ValueError(f"{name}: the patient pattern {pattern!r} does not match (it needs one group)")
        case.patient = safe_id(match.group(1))


def source_values(classes: np.ndarray, label_values: list[int] | None) -> np.ndarray:
    """Map contiguous classes ``0..K-1`` to the source's label values (``manifest["label_values"]``).

    Raises:
        ValueError: a class beyond ``label_values``.
    """
    classes = np.asarray(classes)
    if not label_values or list(label_values) == list(range(len(label_values))):
        return classes
    if classes.size and int(classes.max()) >= len(label_values):
        raise ValueError(f"mask holds class {int(classes.max())}, but the dataset has {len(label_values)} classes")
    return np.asarray(label_values, dtype=np.uint8 if max(label_values) < 256 else np.int16)[classes.astype(np.int64)]


def class_indices(values: np.ndarray, label_values: list[int] | None) -> np.ndarray:
    """Inverse of :func:`source_values`: source label values back to classes (unknown values raise ValueError)."""
    values = np.asarray(values)
    if not label_values or list(label_values) == list(range(len(label_values))):
        return values
    lookup = {int(v): k for k, v in enumerate(label_values)}
    unknown = sorted(set(np.unique(values).astype(int).tolist()) - set(lookup))
    if unknown:
        raise ValueError(f"mask holds values {unknown} that are not among the dataset's label values {label_values}")
    table = np.zeros(max(lookup) + 1, dtype=np.uint8 if len(lookup) < 256 else np.uint16)
    for value, index in lookup.items():
        table[value] = index
    return table[values.astype(np.int64)]

"""HDF5: the ``hdf5`` layout, and ``masks/<id>.h5``.

- ``hdf5``: the Kaggle soft-tissue-sarcoma layout (groups ``ct_data``, ``pet_data``, ``label_data`` holding one
  dataset per patient) or any layout named by ``hdf5_image_keys``/``hdf5_label_key``, stacked samples included
  (:func:`discover_hdf5`); cases load with :func:`load_hdf5_case` (case spec format ``hdf5``).
- :func:`write_hdf5_mask`: ``masks/<id>.h5`` holding the mask at the source's label key, shape and dtype.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from utils import fileio
from utils.formats.base import (
    HDF5_SUFFIXES,
    CaseData,
    CaseError,
    CaseSpec,
    DatasetSource,
    Hdf5Keys,
    _apply_patient_pattern,
    _scan_values,
    as_label_map,
    axis_aligned_affine,
    check_image,
    finalize_source,
    inside_dataset,
    parse_spacing,
    safe_id,
    strip_suffix,
    unreadable_spec,
)

if TYPE_CHECKING:  # imported where used: reading another format never loads it
    import h5py

log = logging.getLogger(__name__)


def _hdf5_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in HDF5_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: no HDF5 file (.h5, .hdf5) found")
    return files


def _open_hdf5(path: str | os.PathLike) -> h5py.File:
    import h5py

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
    import h5py

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
    import h5py

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

    In a folder of several files, a file that cannot be opened, lacks the keys or lies outside the folder (behind a
    symbolic link) becomes one case that fails with that message when loaded (:func:`unreadable_spec`), so the other
    files' cases are still prepared. A patient without the label dataset that the others have fails alone.

    Raises:
        ValueError: an unknown layout or inconsistent keys (of the only file), or no file that can be read.
    """
    options = options or {}
    root = Path(path)
    files = _hdf5_files(root)
    cases, channel_names = [], None
    for file in files:
        try:
            if len(files) > 1:
                inside_dataset(file, root)
            file_cases, names = _discover_hdf5_file(file, options, prefix=len(files) > 1)
        except Exception as error:  # unreadable, damaged or without the keys: that file's case fails, the others go on
            message = str(error) if isinstance(error, ValueError) else f"{file}: cannot read HDF5 file ({error!r})"
            if len(files) == 1:
                raise ValueError(message) from error
            cases.append(unreadable_spec(file, "hdf5", message))
            continue
        if channel_names is not None and names != channel_names:
            raise ValueError(f"{file}: channels {names} differ from the other files' {channel_names}")
        channel_names = names
        cases.extend(file_cases)
    _apply_patient_pattern(cases, options.get("patient_pattern"), [c.id for c in cases])
    values = _scan_values(
        (f"{c.image[0]}:{c.hdf5.label}", _hdf5_label_reader(c))
        for c in cases
        if c.hdf5 is not None and c.hdf5.label and not c.error
    )
    if channel_names is None:
        raise ValueError(f"{root}: no HDF5 file could be read ({cases[0].error}, ...)")
    channels = {str(i): n for i, n in enumerate(channel_names)}
    return finalize_source(strip_suffix(root.name), "hdf5", channels, cases, root, values, None, options)


def _discover_hdf5_file(file: Path, options: dict, prefix: bool) -> tuple[list[CaseSpec], list[str]]:
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
                    label = f"{label_key}/{patient}" if label_key else None
                else:
                    paths = [f"{patient}/{key}" for key in image_keys]
                    label = f"{patient}/{label_key}" if label_key else None
                case_id = safe_id(f"{stem}_{patient}" if prefix else patient)
                spec = _hdf5_spec(file, case_id, paths, label, None, spacing, spacing_from)
                spec.patient = safe_id(patient)
                if label and patient not in label_patients:
                    spec.error = (
                        f"{file}: patient {patient!r} has no label dataset {label!r} "
                        f"({len(label_patients)} other patient(s) have one)"
                    )
                cases.append(spec)
    return cases, [_channel_name(k) for k in image_keys]


def _hdf5_spec(file: Path, case_id: str, images: list, label: str | None, index, spacing, spacing_from) -> CaseSpec:
    return CaseSpec(
        id=case_id,
        format="hdf5",
        image=[str(file.resolve())],
        label=str(file.resolve()) if label else None,
        hdf5=Hdf5Keys(list(images), label, index),
        spacing=spacing,
        spacing_from=spacing_from,
    )


def _hdf5_label_reader(spec: CaseSpec) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        with _open_hdf5(spec.image[0]) as handle:
            return _hdf5_volume(handle, spec.hdf5.label, spec.hdf5.index, spec.image[0])[0]

    return read


def _hdf5_volume(handle: h5py.File, key: str, index: int | None, path: str) -> tuple[np.ndarray, list[int]]:
    """``(Z, Y, X)`` array of dataset ``key`` (sample ``index`` when stacked) and the shape it was stored in."""
    import h5py

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


def load_hdf5_case(spec: CaseSpec) -> CaseData:
    """Load one HDF5 case: each image key is a channel; spacing from the spec; arrays kept as stored."""
    path, keys, index = spec.image[0], spec.hdf5, spec.hdf5.index
    with _open_hdf5(path) as handle:
        channels, shape = [], None
        for key in keys.image:
            data, _ = _hdf5_volume(handle, key, index, path)
            if shape is not None and data.shape != shape:
                raise CaseError(f"{path}: {key!r} has shape {data.shape}, {keys.image[0]!r} has {shape}")
            shape = data.shape
            channels.append(check_image(data, f"{path}:{key}"))
        label, stored, dtype = None, list(shape), "uint8"
        if keys.label:
            raw, stored = _hdf5_volume(handle, keys.label, index, path)
            if raw.shape != shape:
                raise CaseError(f"{path}: label {keys.label!r} has shape {raw.shape}, the image {shape}")
            label, dtype = as_label_map(raw, f"{path}:{keys.label}"), str(raw.dtype)
    writer = {
        "kind": "hdf5",
        "reference": path,
        "key": keys.label or ("labels" if index is not None else f"label_data/{spec.patient}"),
        "shape": stored if index is None else [1, *stored],
        "dtype": dtype,
    }
    return CaseData(spec.id, np.concatenate(channels, axis=-1), label, axis_aligned_affine(spec.spacing), writer)


def write_hdf5_mask(mask: np.ndarray, case: dict, output_dir: str | os.PathLike) -> list[Path]:
    """``masks/<id>.h5`` with the mask stored as the source stored its label: same key, shape and dtype."""
    import h5py

    writer = case["writer"]
    data = mask.reshape(writer["shape"]).astype(writer.get("dtype") or "uint8")
    path = Path(output_dir) / "masks" / f"{case['id']}.h5"

    def save(tmp: Path) -> None:
        with h5py.File(tmp, "w") as handle:
            handle.create_dataset(writer["key"], data=data, compression="gzip")

    return [fileio.write_with(path, save, suffix=".h5")]

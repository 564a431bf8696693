"""Optional exports of a prepared dataset for the classic 2D-slice and patch workflows (``--export``).

They read only the prepared volumes (``volumes/<id>_image.npy``, ``(Z, Y, X, C)``) and ``splits.json``, and write,
per split:

- ``slices/<split>_images.npy`` ``(N, H, W, C)`` float32 and ``slices/<split>_labels.npy`` ``(N, H, W)`` uint8: the
  axial slices (axis 0) of every case, all of them or only those with foreground (train and val only; the test split
  keeps every slice). Slices of different in-plane sizes are brought to one size ``H x W``: with ``--slice-size`` by
  resizing (linear for images, nearest for labels); otherwise ``H x W`` is planned from the prepared shapes
  (:func:`plan_slice_size`) and each slice is padded with zeros (centred, as the sampler and the sliding window
  pad) or, along an axis where it is larger, cropped around its foreground (labelled train and val slices) or cut
  into tiles that cover it (the test split and unlabelled cases, so every voxel is kept).
  ``slices/<split>_index.json`` records what was done, one row per array row: ``[case id, slice, top, left, height,
  width]``: the row holds the window ``[top, top + height) x [left, left + width)`` of the prepared slice (outside
  the slice: padding), resized to ``H x W`` where ``height x width`` differs. :func:`restore_slices` undoes it, so
  predictions of the rows land on the prepared grid, and :func:`utils.preprocessing.restore_label` takes them on to
  the source grid.
- ``patches/<split>_images.npy`` ``(N, D, H, W, C)`` (or ``(N, H, W, C)`` for a 2D patch size) and
  ``patches/<split>_labels.npy``: patches on a grid, or at random centres drawn on foreground and background voxels
  in a given ratio (``1 1.5`` = one foreground patch for 1.5 background ones; ``1 0`` = always on foreground).

Arrays are filled through a memory map, so memory holds one case at a time, and written atomically. Each folder has
``export.json`` with the settings, the row counts and a key of the inputs: a rerun with the same inputs skips it.
Labels files are written for a split only when all its cases are labelled.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from utils import fileio, geometry
from utils.settings import EXPORT_KINDS, PATCH_SAMPLINGS, SLICE_FILTERS, SLICE_SIZE_OUTLIER

SPLITS = ("train", "val", "test")


@dataclass
class ExportSettings:
    """What ``--export`` writes besides the volumes (which are always written: everything else reads them).

    Attributes:
        kinds: any of ``volumes``, ``slices``, ``patches``.
        slice_filter: ``all`` slices, or only ``foreground`` ones (train and val splits; test keeps all).
        slice_size: ``[H, W]`` to resize slices to (linear for images, nearest for labels), or ``None``: pad, crop
            or tile them to one size planned from the prepared shapes (:func:`plan_slice_size`).
        patch_size: ``[D, H, W]`` (3D patches) or ``[H, W]`` (2D patches); needed for ``patches``.
        patch_sampling: ``random`` centres (``patches_per_case`` per case, ``patch_ratio``) or a ``grid`` of
            non-overlapping patches covering each volume (the last one flush with the border).
        patches_per_case: random patches per case.
        patch_ratio: ``[foreground, background]`` weights of patch centres on label > 0 and label == 0 voxels.
        seed: seed of the random patches (each case draws from ``(seed, crc32(case id))``).
    """

    kinds: list[str] = field(default_factory=lambda: ["volumes"])
    slice_filter: str = "all"
    slice_size: list[int] | None = None
    patch_size: list[int] | None = None
    patch_sampling: str = "random"
    patches_per_case: int = 8
    patch_ratio: list[float] = field(default_factory=lambda: [1.0, 1.0])
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.kinds) - set(EXPORT_KINDS))
        if unknown:
            raise ValueError(f"--export takes {', '.join(EXPORT_KINDS)}, got {', '.join(unknown)}")
        if self.slice_filter not in SLICE_FILTERS:
            raise ValueError(f"slice filter must be one of {SLICE_FILTERS}, got {self.slice_filter!r}")
        if self.slice_size is not None and (len(self.slice_size) != 2 or min(self.slice_size) < 1):
            raise ValueError(f"--slice-size takes two positive integers H W, got {self.slice_size}")
        if self.patch_sampling not in PATCH_SAMPLINGS:
            raise ValueError(f"patch sampling must be one of {PATCH_SAMPLINGS}, got {self.patch_sampling!r}")
        if "patches" in self.kinds and self.patch_size is None:
            raise ValueError("--export patches needs --patch-size D H W (or H W for 2D patches)")
        if self.patch_size is not None and (len(self.patch_size) not in (2, 3) or min(self.patch_size) < 1):
            raise ValueError(f"--patch-size takes D H W or H W positive integers, got {self.patch_size}")
        if self.patches_per_case < 1:
            raise ValueError(f"--patches-per-case must be at least 1, got {self.patches_per_case}")
        if len(self.patch_ratio) != 2 or min(self.patch_ratio) < 0 or sum(self.patch_ratio) <= 0:
            raise ValueError(
                f"--patch-ratio takes FOREGROUND BACKGROUND weights >= 0, not both 0, got {self.patch_ratio}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


class _Volumes:
    """Memory-mapped access to the prepared volumes of the manifest's cases."""

    def __init__(self, output: Path, manifest: dict):
        self.output = output
        self.cases = {c["id"]: c for c in manifest["cases"]}

    def image(self, case_id: str) -> np.ndarray:
        return fileio.load_npy(fileio.inside(self.output, self.cases[case_id]["image"]))

    def label(self, case_id: str) -> np.ndarray | None:
        rel = self.cases[case_id].get("label")
        return None if rel is None else fileio.load_npy(fileio.inside(self.output, rel))

    def labelled(self, ids: Sequence[str]) -> bool:
        return all(self.cases[i].get("label") for i in ids)

    def stamp(self) -> list:
        """Name, size and modification time of every volume file (a change invalidates the exports)."""
        stamps = []
        for case_id in sorted(self.cases):
            for rel in (self.cases[case_id]["image"], self.cases[case_id].get("label")):
                if rel:
                    stat = os.stat(fileio.inside(self.output, rel))
                    stamps.append([rel, stat.st_size, stat.st_mtime_ns])
        return stamps


def export_dataset(output: str | os.PathLike, manifest: dict, splits: dict, settings: ExportSettings) -> dict:
    """Write the slice and patch exports that ``settings.kinds`` ask for.

    Args:
        output: the prepared dataset folder (holds ``volumes/``).
        manifest: its manifest (case entries with ``image`` and ``label`` paths).
        splits: ``{"train": [ids], "val": [...], "test": [...]}``.
        settings: what to export.

    Returns:
        ``{kind: {split: rows}}`` for the kinds written.

    Raises:
        ValueError: settings that do not fit the volumes.
    """
    output = Path(output)
    volumes = _Volumes(output, manifest)
    splits = {s: [i for i in splits.get(s, []) if i in volumes.cases] for s in SPLITS}
    counts = {}
    for kind, function in (("slices", export_slices), ("patches", export_patches)):
        if kind not in settings.kinds:
            continue
        folder = output / kind
        key = fileio.digest(kind, settings.to_dict(), splits, volumes.stamp())
        record = folder / "export.json"
        if record.is_file():
            try:
                previous = fileio.read_json(record)
                if previous.get("key") == key and all((folder / f).is_file() for f in previous.get("files", [])):
                    counts[kind] = previous["counts"]
                    continue
            except ValueError:
                pass
        kind_counts, files = function(volumes, splits, settings, folder)
        fileio.write_json(record, {"settings": settings.to_dict(), "counts": kind_counts, "files": files, "key": key})
        counts[kind] = kind_counts
    return counts


def _write_rows(path: Path, shape: tuple, dtype, fill: Callable[[np.ndarray], None]) -> str:
    """Atomically write a ``.npy`` of ``shape`` filled in place by ``fill(memmap)``; return the file name."""

    def write(tmp: Path) -> None:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        fill(array)
        array.flush()
        del array

    fileio.write_with(path, write, suffix=".npy")
    return path.name


def export_slices(volumes: _Volumes, splits: dict, settings: ExportSettings, folder: Path) -> tuple[dict, list]:
    """Write ``slices/<split>_images.npy``, ``_labels.npy`` and ``_index.json``; return row counts and file names.

    Every split gets the same row size: ``settings.slice_size`` (resize) or the size planned from the in-plane shapes
    of all cases (pad, crop or tile); ``export.json`` records it as ``size`` and the way as ``fit``.
    """
    all_ids = [i for ids in splits.values() for i in ids]
    resize = settings.slice_size is not None
    size = tuple(int(v) for v in settings.slice_size) if resize else plan_slice_size(_plane_shapes(volumes, all_ids))
    counts, files = {}, []
    for split, ids in splits.items():
        if not ids:
            continue
        keep_all = settings.slice_filter == "all" or split == "test"
        tile = split == "test" or not volumes.labelled(ids)
        rows = [row for case_id in ids for row in _case_rows(volumes, case_id, keep_all, size, resize, tile)]
        channels = volumes.image(ids[0]).shape[-1]
        fill = partial(_fill_slices, volumes=volumes, rows=rows, size=size)
        files.append(
            _write_rows(
                folder / f"{split}_images.npy", (len(rows), *size, channels), np.float32, partial(fill, source="image")
            )
        )
        if volumes.labelled(ids):
            files.append(
                _write_rows(folder / f"{split}_labels.npy", (len(rows), *size), np.uint8, partial(fill, source="label"))
            )
        index = {"columns": list(INDEX_COLUMNS), "size": list(size), "fit": "resize" if resize else "pad", "rows": rows}
        fileio.write_json(folder / f"{split}_index.json", index)
        files.append(f"{split}_index.json")
        counts[split] = len(rows)
    return counts, files


INDEX_COLUMNS = ("case", "slice", "top", "left", "height", "width")


def _plane_shapes(volumes: _Volumes, ids: Sequence[str]) -> list[tuple[int, int]]:
    return [tuple(int(n) for n in volumes.image(i).shape[1:3]) for i in ids]


def plan_slice_size(shapes: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The common ``(H, W)`` of exported slices: along each axis the largest in-plane size among the cases that is
    at most :data:`utils.settings.SLICE_SIZE_OUTLIER` times the median, so one unusually large case is cropped or
    tiled instead of making every row mostly padding.

    Raises:
        ValueError: no shapes.
    """
    if not len(shapes):
        raise ValueError("no cases to plan the slice size from")
    sizes = np.asarray(shapes, dtype=int).reshape(-1, 2)
    median = np.median(sizes, axis=0)
    return tuple(int(max(n for n in sizes[:, axis] if n <= SLICE_SIZE_OUTLIER * median[axis])) for axis in range(2))


def slice_windows(
    shape: Sequence[int], size: Sequence[int], foreground: tuple | None = None, tile: bool = False
) -> list[tuple[int, int]]:
    """``(top, left)`` of the ``size`` windows that represent a slice of ``shape``.

    Along an axis where the slice is not larger than the window it is centred in it (a negative start: padding).
    Where it is larger, the window is centred on the foreground, ``((y0, y1), (x0, x1))`` inclusive-exclusive
    bounds (or on the slice without foreground) and kept inside the slice; with ``tile``, or where the foreground
    does not fit, windows cover the slice, the last one flush with its end (:func:`grid_starts`).
    """
    starts = []
    for axis, (n, s) in enumerate(zip(shape, size, strict=True)):
        if n <= s:
            starts.append([-((s - n) // 2)])
            continue
        low, high = foreground[axis] if foreground is not None else (0, n)
        if tile or high - low > s:
            starts.append([corner[0] for corner in grid_starts([n], [s])])
        else:
            starts.append([int(min(max((low + high - s) // 2, 0), n - s))])
    return [(int(top), int(left)) for top in starts[0] for left in starts[1]]


def _foreground_box(label_slice: np.ndarray | None) -> tuple | None:
    if label_slice is None or not label_slice.any():
        return None
    rows, cols = np.flatnonzero(label_slice.any(axis=1)), np.flatnonzero(label_slice.any(axis=0))
    return (int(rows[0]), int(rows[-1]) + 1), (int(cols[0]), int(cols[-1]) + 1)


def _case_rows(volumes: _Volumes, case_id: str, keep_all: bool, size: tuple, resize: bool, tile: bool) -> list:
    """The index rows ``[case, z, top, left, height, width]`` of one case."""
    shape = volumes.image(case_id).shape[1:3]
    label = volumes.label(case_id)
    rows = []
    for z in _chosen_slices(volumes, case_id, keep_all):
        if resize:
            rows.append([case_id, z, 0, 0, int(shape[0]), int(shape[1])])
            continue
        box = None if tile or label is None else _foreground_box(np.asarray(label[z]))
        rows += [[case_id, z, top, left, *size] for top, left in slice_windows(shape, size, box, tile)]
    return rows


def _chosen_slices(volumes: _Volumes, case_id: str, keep_all: bool) -> list[int]:
    label = volumes.label(case_id)
    if keep_all or label is None:
        return list(range(volumes.image(case_id).shape[0]))
    return np.flatnonzero(np.asarray(label).reshape(label.shape[0], -1).any(axis=1)).tolist()


def slice_window(plane: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    """``plane[top:top + height, left:left + width]`` with zeros where the window leaves the plane."""
    out = np.zeros((height, width, *plane.shape[2:]), dtype=plane.dtype)
    y0, y1 = max(top, 0), min(top + height, plane.shape[0])
    x0, x1 = max(left, 0), min(left + width, plane.shape[1])
    if y1 > y0 and x1 > x0:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = plane[y0:y1, x0:x1]
    return out


def _fill_slices(array: np.ndarray, volumes: _Volumes, rows: list, size: tuple, source: str) -> None:
    order = 1 if source == "image" else 0
    case_id, volume = None, None
    for i, (row_case, z, top, left, height, width) in enumerate(rows):
        if row_case != case_id:
            case_id, volume = row_case, getattr(volumes, source)(row_case)
        window = slice_window(np.asarray(volume[z]), top, left, height, width)
        if (height, width) != tuple(size):
            window = geometry.resize_volume(window[None], (1, *size), order)[0]
        array[i] = window


def restore_slices(
    rows: np.ndarray, index: Sequence[Sequence], case_id: str, shape: Sequence[int], fill: float = 0
) -> np.ndarray:
    """Undo the slice export for one case: put its rows back on the prepared grid.

    Args:
        rows: the exported rows (or predictions of them) ``(N, H, W[, K])``, every row of the split.
        index: the ``rows`` of ``slices/<split>_index.json`` (``[case, slice, top, left, height, width]`` each).
        case_id: the case to restore.
        shape: its prepared ``(Z, Y, X)``.
        fill: the value of voxels no row holds (slices left out by ``--slice-filter foreground``, crops).

    Returns:
        ``(Z, Y, X[, K])`` of ``rows``' dtype: each row resized back to its window where the export resized it
        (nearest for integer arrays, linear otherwise), its part inside the slice pasted there (where tiles overlap,
        the later one).

    Raises:
        ValueError: ``rows`` and ``index`` of different lengths.
    """
    if len(rows) != len(index):
        raise ValueError(f"{len(rows)} rows but {len(index)} index entries: not the index of these rows")
    out = np.full((*(int(n) for n in shape), *rows.shape[3:]), fill, dtype=rows.dtype)
    order = 0 if np.issubdtype(rows.dtype, np.integer) else 1
    for row, (row_case, z, top, left, height, width) in zip(rows, index, strict=True):
        if row_case != case_id:
            continue
        window = np.asarray(row)
        if tuple(window.shape[:2]) != (height, width):
            window = geometry.resize_volume(window[None], (1, height, width), order)[0].astype(rows.dtype)
        y0, y1 = max(top, 0), min(top + height, out.shape[1])
        x0, x1 = max(left, 0), min(left + width, out.shape[2])
        out[z, y0:y1, x0:x1] = window[y0 - top : y1 - top, x0 - left : x1 - left]
    return out


def grid_starts(shape: Sequence[int], patch: Sequence[int]) -> list[tuple[int, ...]]:
    """Start corners of non-overlapping patches covering ``shape``, the last one along each axis flush with the end.

    ``shape`` must be at least ``patch`` along every axis (pad first).
    """
    axes = []
    for n, p in zip(shape, patch, strict=True):
        starts = list(range(0, n - p + 1, p))
        if starts[-1] + p < n:
            starts.append(n - p)
        axes.append(starts)
    grids = np.meshgrid(*axes, indexing="ij")
    return [tuple(int(v) for v in corner) for corner in np.stack([g.ravel() for g in grids], axis=1)]


def random_starts(
    label: np.ndarray, patch: Sequence[int], count: int, ratio: Sequence[float], rng: np.random.Generator
) -> list[tuple[int, ...]]:
    """Start corners of ``count`` patches centred on foreground (label > 0) and background voxels in ``ratio``.

    The first ``round(count * fg / (fg + bg))`` centres are foreground voxels, the rest background ones; a case
    without foreground gets only background centres. ``label`` must be at least ``patch`` along every axis (pad it).
    """
    label = np.asarray(label)
    foreground = np.flatnonzero(label > 0)
    n_foreground = int(round(count * ratio[0] / (ratio[0] + ratio[1]))) if foreground.size else 0
    starts = []
    for i in range(count):
        if i < n_foreground:
            centre = np.unravel_index(int(rng.choice(foreground)), label.shape)
        else:
            centre = _background_centre(label, rng)
        starts.append(
            tuple(int(min(max(c - p // 2, 0), n - p)) for c, p, n in zip(centre, patch, label.shape, strict=True))
        )
    return starts


def _background_centre(label: np.ndarray, rng: np.random.Generator, tries: int = 20) -> tuple[int, ...]:
    """A random voxel with label 0 (any voxel if none is found in ``tries`` draws)."""
    centre = tuple(int(rng.integers(n)) for n in label.shape)
    for _ in range(tries):
        if label[centre] == 0:
            break
        centre = tuple(int(rng.integers(n)) for n in label.shape)
    return centre


def _pad_to(array: np.ndarray, shape: Sequence[int], value: float) -> np.ndarray:
    """Pad the first ``len(shape)`` axes of ``array`` symmetrically up to ``shape`` (no-op where large enough)."""
    pads = [
        ((max(s - n, 0)) // 2, max(s - n, 0) - max(s - n, 0) // 2)
        for n, s in zip(array.shape[: len(shape)], shape, strict=True)
    ]
    if not any(a or b for a, b in pads):
        return array
    pads += [(0, 0)] * (array.ndim - len(pads))
    return np.pad(array, pads, constant_values=value)


def export_patches(volumes: _Volumes, splits: dict, settings: ExportSettings, folder: Path) -> tuple[dict, list]:
    """Write ``patches/<split>_images.npy`` and ``_labels.npy``; return row counts and file names."""
    patch = [int(v) for v in settings.patch_size]
    patch3 = [1, *patch] if len(patch) == 2 else patch
    counts, files = {}, []
    for split, ids in splits.items():
        if not ids:
            continue
        plans = {case_id: _patch_plan(volumes, case_id, patch3, settings) for case_id in ids}
        total = sum(len(p) for p in plans.values())
        channels = volumes.image(ids[0]).shape[-1]
        fill = partial(_fill_patches, volumes=volumes, plans=plans, patch=patch3, squeeze=len(patch) == 2)
        files.append(
            _write_rows(
                folder / f"{split}_images.npy", (total, *patch, channels), np.float32, partial(fill, source="image")
            )
        )
        if volumes.labelled(ids):
            files.append(
                _write_rows(folder / f"{split}_labels.npy", (total, *patch), np.uint8, partial(fill, source="label"))
            )
        counts[split] = total
    return counts, files


def _patch_plan(volumes: _Volumes, case_id: str, patch: list[int], settings: ExportSettings) -> list[tuple]:
    padded = [max(n, p) for n, p in zip(volumes.image(case_id).shape[:3], patch, strict=True)]
    if settings.patch_sampling == "grid":
        return grid_starts(padded, patch)
    label = volumes.label(case_id)
    label = _pad_to(np.asarray(label), padded, 0) if label is not None else np.zeros(padded, np.uint8)
    rng = np.random.default_rng([settings.seed, zlib.crc32(case_id.encode())])
    return random_starts(label, patch, settings.patches_per_case, settings.patch_ratio, rng)


def _fill_patches(array: np.ndarray, volumes: _Volumes, plans: dict, patch: list, squeeze: bool, source: str) -> None:
    row = 0
    for case_id, starts in plans.items():
        volume = np.asarray(getattr(volumes, source)(case_id))
        if source == "label":
            volume = _pad_to(volume, patch, 0)
        else:
            volume = _pad_image(volume, patch, volume.min(axis=(0, 1, 2)))
        for start in starts:
            block = volume[tuple(slice(s, s + p) for s, p in zip(start, patch, strict=True))]
            array[row] = block[0] if squeeze else block
            row += 1


def _pad_image(volume: np.ndarray, shape: Sequence[int], minimum: np.ndarray) -> np.ndarray:
    """Pad each channel of a ``(Z, Y, X, C)`` image with its own minimum."""
    if all(n >= s for n, s in zip(volume.shape[:3], shape, strict=True)):
        return volume
    return np.stack([_pad_to(volume[..., c], shape, float(minimum[c])) for c in range(volume.shape[-1])], axis=-1)

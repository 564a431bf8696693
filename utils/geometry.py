"""Voxel geometry: affines, reorientation, resampling and cropping, each with its exact inverse.

Conventions used everywhere in the toolkit:

- Volumes are numpy arrays in ``(Z, Y, X)`` order (plus a trailing channel axis for images), that is the reverse of
  the file's ``(i, j, k)`` index order: the order SimpleITK's ``GetArrayFromImage`` returns. Axis 0 is the slice axis.
- An *affine* is a 4x4 matrix that maps an array index ``(a0, a1, a2, 1)`` of such an array to world coordinates in
  millimetres, in RAS+ orientation (nibabel's convention).
- Prepared volumes are reoriented so that array axes ``(0, 1, 2)`` point to ``(S, A, R)``: the RAS+ canonical
  orientation of NIfTI read in ``(k, j, i)`` order.

:class:`GeometryRecord` records the steps applied to one case's grid, so that they can be inverted.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, fields

import nibabel as nib
import numpy as np
from nibabel import orientations

TARGET_AXCODES = ("S", "A", "R")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def nifti_affine_to_zyx(affine_ijk: np.ndarray) -> np.ndarray:
    """Convert a NIfTI (``i, j, k`` index) affine into the affine of the ``(k, j, i)`` array."""
    affine = np.array(affine_ijk, dtype=float)
    out = affine.copy()
    out[:, :3] = affine[:, 2::-1]
    return out


def zyx_affine_to_nifti(affine_zyx: np.ndarray) -> np.ndarray:
    """Inverse of :func:`nifti_affine_to_zyx` (the operation is its own inverse)."""
    return nifti_affine_to_zyx(affine_zyx)


def affine_from_sitk(spacing: Sequence[float], origin: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """Affine of the ``(Z, Y, X)`` array of a SimpleITK image, from its ITK (``x, y, z``, LPS) geometry.

    Only the first three dimensions are used, so 4D images (channels) work too.
    """
    ndim = int(round(len(direction) ** 0.5))
    direction_matrix = np.asarray(direction, dtype=float).reshape(ndim, ndim)[:3, :3]
    ijk = np.eye(4)
    ijk[:3, :3] = _LPS_TO_RAS @ direction_matrix @ np.diag(np.asarray(spacing, dtype=float)[:3])
    ijk[:3, 3] = _LPS_TO_RAS @ np.asarray(origin, dtype=float)[:3]
    return nifti_affine_to_zyx(ijk)


def sitk_geometry_from_affine(affine_zyx: np.ndarray) -> dict:
    """ITK ``spacing``, ``origin`` and ``direction`` (``x, y, z``, LPS) of a ``(Z, Y, X)`` array's affine."""
    ijk = zyx_affine_to_nifti(affine_zyx)
    spacing = np.linalg.norm(ijk[:3, :3], axis=0)
    direction = _LPS_TO_RAS @ ijk[:3, :3] / spacing
    origin = _LPS_TO_RAS @ ijk[:3, 3]
    return {"spacing": spacing.tolist(), "origin": origin.tolist(), "direction": direction.ravel().tolist()}


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def axcodes(affine: np.ndarray) -> tuple[str, str, str]:
    """Anatomical direction each array axis points to, e.g. ``("S", "A", "R")``."""
    return tuple(nib.aff2axcodes(np.asarray(affine)))


def _orientation_transform(source_codes: Sequence[str], target_codes: Sequence[str]) -> np.ndarray:
    return orientations.ornt_transform(
        orientations.axcodes2ornt(tuple(source_codes)), orientations.axcodes2ornt(tuple(target_codes))
    )


def reorient(array: np.ndarray, affine: np.ndarray, target: Sequence[str] = TARGET_AXCODES, *, overwrite: bool = False):
    """Permute and flip the first three axes of ``array`` so they point to ``target`` (exact, no interpolation).

    Args:
        array: ``(Z, Y, X, ...)``; trailing axes (channels) are carried along.
        affine: the array's affine.
        target: axis codes to reach, one letter per axis.
        overwrite: when the axes only need flipping (no permutation) and ``array`` is C-contiguous, flip ``array``
            itself (one plane at a time) instead of copying it: the caller gives the array up.

    Returns:
        ``(reoriented_array, new_affine, source_codes)``; ``source_codes`` is what :func:`undo_reorient` needs.
    """
    source_codes = axcodes(affine)
    transform = _orientation_transform(source_codes, target)
    new_affine = np.asarray(affine) @ orientations.inv_ornt_aff(transform, array.shape[:3])
    flips = [axis for axis in range(3) if transform[axis, 1] < 0]
    if overwrite and array.flags.c_contiguous and array.flags.writeable and list(transform[:, 0]) == [0, 1, 2]:
        return flip_in_place(array, flips), new_affine, list(source_codes)
    out = orientations.apply_orientation(array, transform)
    return np.ascontiguousarray(out), new_affine, list(source_codes)


def flip_in_place(array: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """Reverse ``array`` along ``axes`` (among its first three) in place, with a copy of one plane at a time."""
    if 0 in axes:
        count = array.shape[0]
        for first in range(count // 2):
            plane = array[first].copy()
            array[first] = array[count - 1 - first]
            array[count - 1 - first] = plane
    inplane = tuple(slice(None, None, -1) if axis in axes else slice(None) for axis in (1, 2))
    if 1 in axes or 2 in axes:
        for plane in array:
            plane[...] = plane[inplane].copy()
    return array


def undo_reorient(array: np.ndarray, source_codes: Sequence[str], target: Sequence[str] = TARGET_AXCODES):
    """Bring an array produced by :func:`reorient` back to the source axis order and directions."""
    transform = _orientation_transform(target, source_codes)
    return np.ascontiguousarray(orientations.apply_orientation(array, transform))


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> tuple:
    """Shape after resampling from ``spacing`` to ``target_spacing`` (at least one voxel per axis)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing, strict=True))


def resize_volume(array: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """Resample the first three axes of ``array`` onto ``shape`` (voxel edges aligned), keeping trailing axes.

    Args:
        array: ``(Z, Y, X)`` or ``(Z, Y, X, C)``.
        shape: the new ``(Z, Y, X)``.
        order: spline order: 0 nearest (labels), 1 linear, 3 cubic.
    """
    shape = tuple(int(v) for v in shape)
    if tuple(array.shape[:3]) == shape:
        return array
    out_shape = shape + tuple(array.shape[3:])
    if order == 0:
        return resize_nearest(array, shape)
    if np.issubdtype(array.dtype, np.integer):
        return _resize_integers(array, out_shape, order)
    from skimage.transform import resize  # here: loading it costs 13 MiB that data_gen.py on CT never needs

    out = resize(
        array.astype(np.float32, copy=False),
        out_shape,
        order=order,
        mode="edge",
        anti_aliasing=False,
        preserve_range=True,
    )
    return out.astype(np.float32, copy=False)


def _resize_integers(array: np.ndarray, out_shape: tuple, order: int) -> np.ndarray:
    """What :func:`resize_volume` gives for ``array.astype(np.float32)``, without that copy of an integer volume (a CT
    in HU): skimage's ``resize`` (no anti-aliasing, edges repeated) is scipy's ``zoom`` on the voxel grid followed by a
    clip to the input's range, and scipy interpolates in float64 whether the voxels come as integers or float32."""
    from scipy import ndimage

    out = np.empty(out_shape, dtype=np.float32)
    zoom = [1 / factor for factor in np.divide(array.shape, out_shape)]
    ndimage.zoom(array, zoom, output=out, order=order, mode="nearest", grid_mode=True)
    return np.clip(out, float(array.min()), float(array.max()), out=out)


def resize_nearest(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resampling of the first ``len(shape)`` axes of ``array`` by index lookup (voxel edges
    aligned; trailing axes kept): exact, dtype-preserving and fast for label maps and display slices.

    Args:
        array: e.g. ``(Z, Y, X)``, ``(Z, Y, X, C)`` or a slice ``(H, W)``.
        shape: the new sizes of the leading axes, e.g. ``(Z', Y', X')`` or ``(H', W')``.
    """
    index = [
        np.minimum(((np.arange(n) + 0.5) * (old / n)).astype(np.int64), old - 1)
        for n, old in zip(shape, array.shape[: len(shape)], strict=True)
    ]
    return array[np.ix_(*index)]


def resampled_affine(affine: np.ndarray, old_shape: Sequence[int], new_shape: Sequence[int]) -> np.ndarray:
    """Affine of a volume resampled from ``old_shape`` to ``new_shape`` over the same field of view."""
    scale = np.asarray(old_shape, dtype=float) / np.asarray(new_shape, dtype=float)
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = (scale - 1.0) / 2.0
    return np.asarray(affine) @ step


def bounding_box(mask: np.ndarray, margin: Sequence[int] | int = 0) -> list[list[int]]:
    """``[[start, stop], ...]`` of the non-zero voxels of ``mask`` (whole array if empty), grown by ``margin``."""
    margin = [margin] * mask.ndim if np.isscalar(margin) else list(margin)
    if not mask.any():
        return [[0, n] for n in mask.shape]
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        box.append(
            [
                max(0, int(present[0]) - margin[axis]),
                min(mask.shape[axis], int(present[-1]) + 1 + margin[axis]),
            ]
        )
    return box


def crop(array: np.ndarray, box: Sequence[Sequence[int]]) -> np.ndarray:
    """Crop the first ``len(box)`` axes of ``array`` to ``box``."""
    return array[tuple(slice(a, b) for a, b in box)]


def uncrop(array: np.ndarray, box: Sequence[Sequence[int]], shape: Sequence[int], fill: float = 0) -> np.ndarray:
    """Place ``array`` back at ``box`` inside a new array of spatial ``shape`` filled with ``fill``."""
    out = np.full(tuple(shape) + tuple(array.shape[len(box) :]), fill, dtype=array.dtype)
    out[tuple(slice(a, b) for a, b in box)] = array
    return out


@dataclass(frozen=True)
class GeometryRecord:
    """What preparing a case did to its grid, so that a prediction goes back onto the source grid: made by
    :func:`utils.preprocessing.prepare_case`, inverted by :func:`utils.preprocessing.restore_label`, stored as the
    case's ``geometry`` in ``manifest.json`` (:meth:`to_json`, :meth:`from_json`).

    Shapes are ``[Z, Y, X]``; spacings are mm along those axes; affines are 4x4 lists of rows mapping a ``(z, y, x)``
    index to RAS mm. The steps, in order: reorientation to :data:`TARGET_AXCODES`, crop, resampling.

    Attributes:
        source_shape, source_affine, source_spacing: the source array's grid (where masks are written).
        source_axcodes: the direction each source axis points to (what :func:`undo_reorient` needs).
        oriented_shape: the shape after reorientation.
        crop_box: ``[[start, stop], ...]`` per axis of the reoriented array.
        cropped_shape: the shape inside the crop box.
        shape, spacing, affine: the prepared grid; ``spacing`` is its true voxel size (the field of view is kept).
        target_spacing: the spacing asked for (``downsample`` applied in-plane); ``spacing`` differs from it by the
            rounding of the shape.
        downsample: the in-plane downsampling factor.
    """

    source_shape: list[int]
    source_affine: list[list[float]]
    source_spacing: list[float]
    source_axcodes: list[str]
    oriented_shape: list[int]
    crop_box: list[list[int]]
    cropped_shape: list[int]
    shape: list[int]
    spacing: list[float]
    target_spacing: list[float]
    downsample: int
    affine: list[list[float]]

    def to_json(self) -> dict:
        """The plain JSON object, keys in field order."""
        return {item.name: copy.deepcopy(getattr(self, item.name)) for item in fields(self)}

    @classmethod
    def from_json(cls, data: dict, where: str = "geometry record") -> GeometryRecord:
        """The record of a JSON object as :meth:`to_json` writes it.

        Raises:
            ValueError: naming ``where`` and the key, for an unknown or missing key, or a value of the wrong shape
                or type.
        """
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object, got {data!r}")
        names = [item.name for item in fields(cls)]
        unknown = [key for key in data if key not in names]
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r} (known keys: {', '.join(names)})")
        missing = [name for name in names if name not in data]
        if missing:
            raise ValueError(f"{where}: missing key {missing[0]!r}")
        for name in names:
            _check_record_value(name, data[name], where)
        return cls(**copy.deepcopy(data))


_RECORD_ARRAYS = {"source_affine": (4, 4), "affine": (4, 4), "crop_box": (3, 2)}
_RECORD_INTEGERS = ("source_shape", "oriented_shape", "crop_box", "cropped_shape", "shape")


def _check_record_value(name: str, value, where: str) -> None:
    """Refuse a :class:`GeometryRecord` value of the wrong type or shape.

    Raises:
        ValueError: naming ``where``, the key, what it must be and the value.
    """
    if name == "downsample":
        expected = "a positive integer"
        valid = type(value) is int and value >= 1
    elif name == "source_axcodes":
        expected = "three axis codes"
        valid = isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) for v in value)
    else:
        shape = _RECORD_ARRAYS.get(name, (3,))
        kind = np.integer if name in _RECORD_INTEGERS else np.number
        try:
            array = np.asarray(value)
            valid = isinstance(value, list) and array.shape == shape and np.issubdtype(array.dtype, kind)
        except ValueError:  # ragged lists
            valid = False
        expected = f"{'x'.join(map(str, shape))} {'integers' if kind is np.integer else 'numbers'}"
    if not valid:
        raise ValueError(f"{where}: key {name!r} must be {expected}, got {value!r}")

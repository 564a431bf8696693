"""Preprocessing of one case and its exact inverse for predictions.

``prepare_case`` turns a :class:`~utils.formats.CaseData` into the prepared arrays (reoriented, cropped, resampled,
normalised) and a :class:`~utils.geometry.GeometryRecord` (stored as plain JSON in the manifest) that
:func:`restore_label` uses to put a prediction back on the source grid. The dataset-level statistics that some
steps need (median spacing, CT intensity percentiles) come from the fingerprint (:func:`case_fingerprint` and
:func:`aggregate_fingerprint`).
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from utils import geometry
from utils.formats import CaseData
from utils.geometry import GeometryRecord
from utils.settings import CROPS, EQUALIZATIONS, INTERPOLATIONS, NORMALIZATIONS


@dataclass
class PreprocessSettings:
    """Every preprocessing choice; recorded in ``manifest.json`` so that new images can be prepared identically.

    Attributes:
        spacing: ``"median"`` (the dataset's median), ``"original"`` (no resampling) or ``[z, y, x]`` in mm.
        window: ``[low, high]`` intensity window (e.g. HU) applied to every channel before normalisation.
        clip_percentiles: ``[low, high]`` per-case percentiles to clip to (after the window).
        normalize: ``auto`` (``ct`` for CT channels, ``zscore`` otherwise; nothing more after ``equalize``),
            ``zscore`` (per case), ``zscore_dataset`` (the dataset's mean and std of all voxels, from the fingerprint),
            ``zscore_nonzero`` (per case, inside the voxels where some channel is non-zero; 0 outside, as nnU-Net does
            for skull-stripped MR), ``minmax`` (to [0, 1]), ``ct`` (clip to the dataset's 0.5/99.5 foreground
            percentiles, then z-score with the dataset's foreground mean and std, as nnU-Net does), or ``none``.
        equalize: ``none``, ``hist`` (histogram equalisation of the whole volume) or ``clahe`` (contrast-limited
            adaptive histogram equalisation, slice by slice), both from scikit-image, output in [0, 1]; applied
            after the window and percentile clipping, before ``normalize``.
        crop: ``none``, ``foreground`` (label bounding box, labelled cases only) or ``nonzero`` (image).
        crop_margin: voxels kept around the crop box.
        image_order: spline order for resampling images: 0 nearest, 1 linear, 3 cubic B-spline (labels: nearest,
            then each class's volume is restored, see :func:`resample_label`).
        downsample: integer in-plane (Y, X) downsampling factor applied on top of the target spacing (512 → 256
            with 2): the in-plane target spacing is multiplied by it, so images are interpolated with
            ``image_order`` (linear with 2: each pixel is the mean of a 2x2 block) and labels take the nearest
            voxel; ``restore_label`` inverts it like any resampling.
        label_map, binarize, label_values: the label remapping that the reader applied (``{source: target}``,
            ``> 0``) and the source value of each resulting class; recorded here, applied in :mod:`utils.formats`.
    """

    spacing: str | list[float] = "median"
    window: list[float] | None = None
    clip_percentiles: list[float] | None = None
    normalize: str = "auto"
    crop: str = "none"
    crop_margin: int = 0
    image_order: int = 1
    equalize: str = "none"
    downsample: int = 1
    label_map: dict | None = None
    binarize: bool = False
    label_values: list[int] | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        if self.equalize not in EQUALIZATIONS:
            raise ValueError(f"equalize must be one of {EQUALIZATIONS}, got {self.equalize!r}")
        if self.image_order not in INTERPOLATIONS.values():
            raise ValueError(f"image_order must be 0, 1 or 3, got {self.image_order!r}")
        if not isinstance(self.downsample, int) or self.downsample < 1:
            raise ValueError(f"downsample must be a positive integer, got {self.downsample!r}")
        if self.equalize != "none" and self.normalize == "ct":
            raise ValueError(
                "normalize 'ct' uses HU statistics and cannot follow equalize; pick zscore, minmax or none"
            )
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if not (self.spacing in ("median", "original") or _is_spacing(self.spacing)):
            raise ValueError(f"spacing must be 'median', 'original' or three positive numbers, got {self.spacing!r}")
        if self.window is not None and (len(self.window) != 2 or self.window[0] >= self.window[1]):
            raise ValueError(f"window must be LOW HIGH with LOW < HIGH, got {self.window!r}")
        if self.clip_percentiles is not None and not (0 <= self.clip_percentiles[0] < self.clip_percentiles[1] <= 100):
            raise ValueError(f"clip percentiles must satisfy 0 <= LOW < HIGH <= 100, got {self.clip_percentiles!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _is_spacing(value) -> bool:
    return isinstance(value, list | tuple) and len(value) == 3 and all(float(v) > 0 for v in value)


def channel_normalization(settings: PreprocessSettings, channel_name: str) -> str:
    """The normalisation a channel gets: ``auto`` becomes ``ct`` for CT channels and ``zscore`` for the rest
    (``none`` after histogram equalisation, whose output is already in [0, 1])."""
    if settings.normalize != "auto":
        return settings.normalize
    if settings.equalize != "none":
        return "none"
    return "ct" if channel_name.strip().upper() == "CT" else "zscore"


def target_spacing(settings: PreprocessSettings, fingerprint: dict | None, case_spacing: Sequence[float]) -> list:
    """The spacing a case is resampled to under ``settings``."""
    if settings.spacing == "original":
        return [float(v) for v in case_spacing]
    if settings.spacing == "median":
        if fingerprint is None:
            raise ValueError("spacing 'median' needs the dataset fingerprint")
        return [float(v) for v in fingerprint["median_spacing"]]
    return [float(v) for v in settings.spacing]


def prepare_case(
    case: CaseData,
    settings: PreprocessSettings,
    fingerprint: dict | None,
    channel_names: Sequence[str],
    *,
    release: bool = False,
) -> tuple[np.ndarray, np.ndarray | None, GeometryRecord]:
    """Reorient, crop, resample and normalise one case.

    Args:
        case: as read by :func:`utils.formats.load_case`.
        settings: the preprocessing choices.
        fingerprint: dataset fingerprint (median spacing, CT statistics), see :func:`aggregate_fingerprint`.
        channel_names: one modality name per image channel (``"CT"`` selects CT normalisation under ``auto``).
        release: take over the case's arrays (``case.image`` and ``case.label`` become ``None``): they are flipped,
            normalised in place and freed as soon as their resampled copies exist, so that a full-size CT needs one
            copy of its image at a time plus the one being resampled (``data_gen.py``). The results are the same.

    Returns:
        ``(image, label, record)``: image ``(Z, Y, X, C)`` float32, label ``(Z, Y, X)`` uint8 or ``None``, and the
        geometry record that :func:`restore_label` inverts.
    """
    image, label, source_shape = case.image, case.label, list(case.image.shape[:3])
    if release:
        case.image = case.label = None
    image, affine, source_codes = geometry.reorient(image, case.affine, overwrite=release)
    label = None if label is None else geometry.reorient(label, case.affine, overwrite=release)[0]
    oriented_shape = list(image.shape[:3])
    box = _crop_box(image, label, settings)
    image, label = geometry.crop(image, box), None if label is None else geometry.crop(label, box)
    cropped_shape = list(image.shape[:3])
    crop_affine = affine.copy()
    crop_affine[:3, 3] = affine[:3, :3] @ np.array([b[0] for b in box], dtype=float) + affine[:3, 3]
    spacing = geometry.spacing_from_affine(affine)
    new_spacing = target_spacing(settings, fingerprint, spacing)
    new_spacing = [new_spacing[0], new_spacing[1] * settings.downsample, new_spacing[2] * settings.downsample]
    new_shape = geometry.resampled_shape(cropped_shape, spacing, new_spacing)
    if label is not None:  # first, while only the source image is held
        label = resample_label(label, new_shape)
    if release:
        return_freed_memory()  # the label's freed temporaries, before the image's float32 copy is made
    resized = geometry.resize_volume(image, new_shape, settings.image_order)  # float32 (nearest: the source's dtype)
    owned = release or resized is not image
    if resized.dtype != np.float32:  # an integer source (load_case(integers=True)), not resampled or nearest
        resized, owned = resized.astype(np.float32), True
    image = None  # the source image is freed here when released
    image = normalize_image(resized, settings, fingerprint, channel_names, in_place=owned)
    del resized
    new_affine = geometry.resampled_affine(crop_affine, cropped_shape, new_shape)
    record = GeometryRecord(
        source_shape=source_shape,
        source_affine=np.asarray(case.affine).tolist(),
        source_spacing=list(case.spacing),
        source_axcodes=source_codes,
        oriented_shape=oriented_shape,
        crop_box=box,
        cropped_shape=cropped_shape,
        shape=list(new_shape),
        spacing=list(geometry.spacing_from_affine(new_affine)),
        target_spacing=[float(v) for v in new_spacing],
        downsample=settings.downsample,
        affine=new_affine.tolist(),
    )
    return image.astype(np.float32, copy=False), label, record


def return_freed_memory() -> None:
    """Give the pages of freed arrays that glibc keeps inside its heap back to the system (``malloc_trim``).

    glibc serves allocations below a threshold that grows with the arrays freed (up to 32 MiB) from its heap and keeps
    their pages once freed; on a 512x512x64 CT that kept 25 to 70 MiB through the image's resampling. Nothing happens
    where the C library is not glibc.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # another C library (musl)
        return None


def resample_label(label: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resample a ``(Z, Y, X)`` label map onto ``shape`` (same field of view) keeping each class's volume.

    Nearest-neighbour resampling first; then each class is brought to the voxel count that holds its source volume
    (``count * new voxels / old voxels``, rounded, at least one voxel for a class that is present): surplus voxels
    with the lowest linearly interpolated class fraction go to background, missing ones are taken from background
    voxels with the highest fraction. Integer upsampling needs no change, so it stays an exact inverse of nearest
    downsampling (:func:`restore_label`).

    Returns:
        The resampled label map, same dtype.
    """
    shape = tuple(int(n) for n in shape)
    out = geometry.resize_volume(label, shape, 0)
    if tuple(label.shape) == shape:
        return out
    scale = float(np.prod(shape)) / float(np.prod(label.shape))
    counts = count_values(label)
    new_counts = count_values(out, len(counts))
    for value in np.flatnonzero(counts)[1:] if counts.size > 1 else []:
        target = max(1, int(round(counts[value] * scale)))
        if new_counts[value] != target:
            _adjust_class(out, label, int(value), target - int(new_counts[value]))
    return out


def count_values(label: np.ndarray, minlength: int = 0, block: int = 2**18) -> np.ndarray:
    """``np.bincount(label.ravel(), minlength=minlength)`` of a non-negative integer array, counted ``block`` voxels at
    a time: no int64 copy of the whole array (8 bytes per voxel)."""
    flat = label.reshape(-1)
    counts = np.zeros(minlength, dtype=np.int64)
    for start in range(0, flat.size, block):
        part = np.bincount(flat[start : start + block].astype(np.int64), minlength=counts.size)
        if part.size > counts.size:
            part[: counts.size] += counts
            counts = part
        else:
            counts += part
    return counts


def _adjust_class(out: np.ndarray, label: np.ndarray, value: int, change: int) -> None:
    """Add (``change > 0``) or remove voxels of class ``value`` in ``out``, ranked by its interpolated fraction.

    Removal takes the voxels of the class with the lowest fractions, addition the background voxels with the highest
    (ties in array order). Only the candidates are kept, not the fraction of the whole box: removal first looks among
    the class's border voxels (fraction below :data:`_INTERIOR`), which rank before every interior voxel.
    """
    mask = label == value
    box = geometry.bounding_box(mask)
    target_box = []
    for (start, stop), old, new in zip(box, label.shape, out.shape, strict=True):
        ratio = new / old
        target_box.append([max(0, int(np.floor(start * ratio)) - 1), min(new, int(np.ceil(stop * ratio)) + 1)])
    region = out[tuple(slice(a, b) for a, b in target_box)]  # a view: the choice is written into out
    if change < 0:
        candidates, fractions = _candidates(mask, out.shape, region, target_box, value, below=_INTERIOR)
        if candidates.size < -change:  # more to remove than the border holds: rank every voxel of the class
            candidates, fractions = _candidates(mask, out.shape, region, target_box, value, below=None)
        chosen = candidates[np.argsort(fractions, kind="stable")[:-change]]
        fill = 0
    else:
        candidates, fractions = _candidates(mask, out.shape, region, target_box, 0, below=None, positive=True)
        chosen = candidates[np.argsort(-fractions, kind="stable")[:change]]
        fill = value
    region[np.unravel_index(chosen, region.shape)] = fill


_INTERIOR = 0.999  # a fraction at or above it: the voxel's whole neighbourhood is of the class
_FRACTION_VOXELS = 2**18  # voxels of the box whose fractions are interpolated at once (1 MiB of float32)


def _candidates(
    mask: np.ndarray,
    shape: Sequence[int],
    region: np.ndarray,
    box: Sequence[Sequence[int]],
    value: int,
    below: float | None,
    positive: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices into ``region`` (the resampled grid of ``shape`` inside ``box``) of its voxels equal to ``value``
    whose fraction of ``mask`` is below ``below`` (``None``: any) and, with ``positive``, above 0; and those
    fractions. Computed a slab of ``box`` at a time, in array order."""
    rows = max(1, _FRACTION_VOXELS // max(1, region.shape[1] * region.shape[2]))
    indices, values = [], []
    for first in range(0, region.shape[0], rows):
        last = min(first + rows, region.shape[0])
        slab = [[box[0][0] + first, box[0][0] + last], box[1], box[2]]
        fraction = _linear_fraction(mask, shape, slab)
        chosen = region[first:last] == value
        if below is not None:
            chosen &= fraction < below
        if positive:
            chosen &= fraction > 0
        indices.append(np.flatnonzero(chosen) + first * region.shape[1] * region.shape[2])
        values.append(fraction[chosen])
    return np.concatenate(indices), np.concatenate(values)


def _linear_fraction(mask: np.ndarray, shape: Sequence[int], box: Sequence[Sequence[int]]) -> np.ndarray:
    """Linear interpolation of a boolean ``mask`` at the voxel centres of ``box`` on a grid of ``shape`` (edges of both
    grids aligned, as :func:`utils.geometry.resize_volume` does)."""
    axes = []
    for (start, stop), old, new in zip(box, mask.shape, shape, strict=True):
        position = np.clip((np.arange(start, stop) + 0.5) * old / new - 0.5, 0, old - 1)
        low = np.floor(position).astype(np.int64)
        high = np.minimum(low + 1, old - 1)
        axes.append((low, high, (position - low).astype(np.float32)))
    result = np.zeros([b - a for a, b in box], dtype=np.float32)
    for corner in range(8):
        picks = [axes[a][(corner >> a) & 1] for a in range(3)]
        weights = [axes[a][2] if (corner >> a) & 1 else 1 - axes[a][2] for a in range(3)]
        weight = weights[0][:, None, None] * weights[1][None, :, None] * weights[2][None, None, :]
        result += weight * mask[np.ix_(*picks)]
    return result


def _crop_box(image: np.ndarray, label: np.ndarray | None, settings: PreprocessSettings) -> list[list[int]]:
    if settings.crop == "nonzero":
        return geometry.bounding_box(np.any(image != 0, axis=-1), settings.crop_margin)
    if settings.crop == "foreground" and label is not None and label.any():
        return geometry.bounding_box(label > 0, settings.crop_margin)
    return [[0, n] for n in image.shape[:3]]


def normalize_image(
    image: np.ndarray,
    settings: PreprocessSettings,
    fingerprint: dict | None,
    channel_names: Sequence[str],
    *,
    in_place: bool = False,
) -> np.ndarray:
    """Window, clip, equalise and normalise each channel of a ``(Z, Y, X, C)`` image as ``settings`` say.

    With ``in_place`` (and a float32 ``image``) the result is written into ``image`` itself, channel by channel, with
    the same arithmetic: no second copy of the volume.

    Raises:
        ValueError: a dataset-level normalisation without the fingerprint statistics it needs.
    """
    in_place = in_place and image.dtype == np.float32 and image.flags.writeable
    out = image if in_place else np.empty(image.shape, dtype=np.float32)
    names = [channel_names[c] if c < len(channel_names) else "" for c in range(image.shape[-1])]
    methods = [channel_normalization(settings, name) for name in names]
    nonzero = np.any(image != 0, axis=-1) if "zscore_nonzero" in methods else None
    for c, method in enumerate(methods):
        channel = image[..., c] if in_place else image[..., c].astype(np.float32)  # owned: changed in place below
        if settings.window is not None:
            np.clip(channel, *settings.window, out=channel)
        if settings.clip_percentiles is not None:
            channel = np.clip(channel, *np.percentile(channel, settings.clip_percentiles))
        channel = equalize_channel(channel, settings.equalize)
        stats = (fingerprint or {}).get("intensity", {}).get(str(c))
        if method == "zscore_nonzero":
            channel = _zscore_inside(channel, nonzero)
        else:
            channel = _normalize_channel(channel, method, settings, stats)
        if not np.may_share_memory(channel, out):  # not already written in place
            out[..., c] = channel
    return out


def equalize_channel(channel: np.ndarray, method: str) -> np.ndarray:
    """Histogram equalisation of a ``(Z, Y, X)`` channel into [0, 1]: ``hist`` over the volume, ``clahe`` per slice.

    A constant channel becomes zeros.
    """
    if method == "none":
        return channel
    from skimage import exposure

    low, high = float(channel.min()), float(channel.max())
    if high <= low:
        return np.zeros_like(channel, dtype=np.float32)
    if method == "hist":
        return exposure.equalize_hist(channel, nbins=256).astype(np.float32)
    scaled = (channel - low) / (high - low)
    return np.stack([exposure.equalize_adapthist(plane, clip_limit=0.01) for plane in scaled]).astype(np.float32)


def _zscore_inside(channel: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Z-score with the mean and std of the voxels inside ``mask``; 0 outside (all voxels if the mask is empty)."""
    if not mask.any():
        return (channel - channel.mean()) / max(float(channel.std()), 1e-8)
    values = channel[mask]
    out = (channel - values.mean()) / max(float(values.std()), 1e-8)
    return np.where(mask, out, 0.0).astype(np.float32)


def _normalize_channel(channel: np.ndarray, method: str, settings: PreprocessSettings, stats: dict | None):
    """Normalise ``channel`` in place (the caller owns it) and return it."""
    if method == "zscore":
        mean, std = channel.mean(), max(float(channel.std()), 1e-8)
        return _shift_scale(channel, mean, std)
    if method == "zscore_dataset":
        if not stats or "dataset_mean" not in stats:
            raise ValueError(
                "zscore_dataset needs the dataset's mean and std in the fingerprint; "
                "delete the output's .cache folder if it was made by an older version"
            )
        return _shift_scale(channel, stats["dataset_mean"], max(stats["dataset_std"], 1e-8))
    if method == "minmax":
        low, high = settings.window or (float(channel.min()), float(channel.max()))
        return _shift_scale(channel, low, max(high - low, 1e-8))
    if method == "ct":
        if settings.window is not None:
            low, high = settings.window
            return _shift_scale(channel, low, high - low)
        if not stats or "mean" not in stats:
            raise ValueError(
                "CT normalisation needs foreground intensity statistics in the fingerprint "
                "(labelled cases), or an explicit --window"
            )
        np.clip(channel, stats["percentile_00_5"], stats["percentile_99_5"], out=channel)
        return _shift_scale(channel, stats["mean"], max(stats["std"], 1e-8))
    return channel


def _shift_scale(channel: np.ndarray, shift, scale) -> np.ndarray:
    """``(channel - shift) / scale`` computed in ``channel`` itself (the same float32 or float64 arithmetic)."""
    np.subtract(channel, shift, out=channel)
    np.divide(channel, scale, out=channel)
    return channel


def restore_label(prediction: np.ndarray, record: GeometryRecord) -> np.ndarray:
    """Put a prediction on the prepared grid back onto the source grid of the case.

    Args:
        prediction: class probabilities ``(Z, Y, X, K)`` (resampled linearly, then arg-maxed, as nnU-Net does) or an
            integer label map ``(Z, Y, X)`` (resampled nearest) on the prepared grid.
        record: the case's geometry record from :func:`prepare_case`.

    Returns:
        Integer label map ``(Z, Y, X)`` in the source array's order and shape (uint8).
    """
    cropped_shape = record.cropped_shape
    if prediction.ndim == 4:
        probabilities = geometry.resize_volume(prediction, cropped_shape, 1)
        label = np.argmax(probabilities, axis=-1).astype(np.uint8)
    else:
        label = geometry.resize_volume(prediction.astype(np.uint8), cropped_shape, 0)
    label = geometry.uncrop(label, record.crop_box, record.oriented_shape)
    return geometry.undo_reorient(label, record.source_axcodes)

"""Whole-volume inference: sliding windows with Gaussian or constant blending and optional mirroring (TTA).

One function, :func:`predict_volume`, serves validation in ``train.py`` and ``evaluation.py``. 2D models see every
slice (axis 0) of the volume, windows tiled over ``(Y, X)`` and batched across slices; 3D models see windows tiled
over ``(Z, Y, X)``. Windows overlap by ``overlap`` of the patch size; each prediction is weighted by a Gaussian
importance map (sigma = patch / 8, as in nnU-Net) or uniformly, and the weighted sum is divided by the summed weights.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
from tqdm import tqdm

BLENDS = ("gaussian", "constant")


def importance_map(patch_size: Sequence[int], blend: str = "gaussian", sigma_scale: float = 1 / 8) -> np.ndarray:
    """Weights of one window: a separable Gaussian (max 1, no zeros) or ones."""
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    if blend == "constant":
        return np.ones(tuple(patch_size), dtype=np.float32)
    weights = np.ones((), dtype=np.float64)
    for p in patch_size:
        centre, sigma = (p - 1) / 2.0, max(p * sigma_scale, 1e-6)
        profile = np.exp(-0.5 * ((np.arange(p) - centre) / sigma) ** 2)
        weights = np.multiply.outer(weights, profile)
    weights = weights / weights.max()
    weights = np.maximum(weights, weights[weights > 0].min())
    return weights.astype(np.float32)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Evenly spaced window starts covering ``size`` with windows of ``patch`` overlapping by ``overlap``."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be within [0, 1), got {overlap}")
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    count = math.ceil((size - patch) / step) + 1
    return sorted({int(round(v)) for v in np.linspace(0, size - patch, count)})


def mirrored(predict: Callable[[np.ndarray], np.ndarray], spatial_axes: Sequence[int]) -> Callable:
    """Wrap ``predict`` to average over every combination of flips of ``spatial_axes`` (test-time mirroring)."""
    combos = [c for r in range(len(spatial_axes) + 1) for c in itertools.combinations(spatial_axes, r)]

    def predict_mirrored(batch: np.ndarray) -> np.ndarray:
        total = None
        for axes in combos:
            flipped = np.flip(batch, axes) if axes else batch
            out = predict(np.ascontiguousarray(flipped))
            out = np.flip(out, axes) if axes else out
            total = out if total is None else total + out
        return total / len(combos)

    return predict_mirrored


def sliding_window(
    images: np.ndarray,
    predict: Callable[[np.ndarray], np.ndarray],
    patch_size: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    blend: str = "gaussian",
    batch_size: int = 4,
    progress: bool = False,
) -> np.ndarray:
    """Tile windows over ``images`` ``(N, *spatial, C)`` and blend ``predict``'s outputs into ``(N, *spatial, K)``.

    Args:
        images: ``N`` independent inputs (the slices of a volume for 2D, one volume for 3D).
        predict: maps a batch ``(B, *patch, C)`` to probabilities ``(B, *patch, K)``.
        patch_size: the window, one entry per spatial axis.
        num_classes: ``K``.
        overlap: fraction of the window shared by neighbours.
        blend: ``gaussian`` or ``constant``.
        batch_size: windows per call of ``predict``.
        progress: show a progress bar over windows.
    """
    spatial = images.shape[1:-1]
    if len(spatial) != len(patch_size):
        raise ValueError(f"patch size {tuple(patch_size)} does not match the input's spatial shape {spatial}")
    pad = [max(0, p - s) for s, p in zip(spatial, patch_size, strict=True)]
    padding = [(0, 0)] + [(d // 2, d - d // 2) for d in pad] + [(0, 0)]
    if any(pad):
        images = np.pad(images, padding)
    padded = images.shape[1:-1]
    weights = importance_map(patch_size, blend)
    output = np.zeros((images.shape[0], *padded, num_classes), dtype=np.float32)
    total = np.zeros((images.shape[0], *padded), dtype=np.float32)
    starts = list(itertools.product(*[window_starts(s, p, overlap) for s, p in zip(padded, patch_size, strict=True)]))
    jobs = [(n, s) for n in range(images.shape[0]) for s in starts]
    bar = tqdm(total=len(jobs), desc="windows", unit="win", leave=False, disable=not progress)
    for begin in range(0, len(jobs), batch_size):
        chunk = jobs[begin : begin + batch_size]
        windows = [(n, tuple(slice(a, a + p) for a, p in zip(s, patch_size, strict=True))) for n, s in chunk]
        batch = np.stack([images[(n, *w)] for n, w in windows])
        probabilities = np.asarray(predict(batch), dtype=np.float32)
        for (n, w), prob in zip(windows, probabilities, strict=True):
            output[(n, *w)] += prob * weights[..., None]
            total[(n, *w)] += weights
        bar.update(len(chunk))
    bar.close()
    output /= total[..., None]
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(padding[1:-1], spatial, strict=True))
    return output[(slice(None), *crop)]


def model_predictor(model) -> Callable[[np.ndarray], np.ndarray]:
    """``batch -> probabilities`` for a Keras model (first output of deep-supervision models), as float32 numpy."""
    import keras

    def predict(batch: np.ndarray) -> np.ndarray:
        out = model(batch, training=False)
        if isinstance(out, list | tuple):
            out = out[0]
        return keras.ops.convert_to_numpy(keras.ops.cast(out, "float32"))

    return predict


def predict_volume(
    model,
    image: np.ndarray,
    patch_size: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    blend: str = "gaussian",
    batch_size: int = 4,
    tta: bool = False,
    progress: bool = False,
    predict: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Class probabilities ``(Z, Y, X, K)`` for a prepared image ``(Z, Y, X, C)``.

    Args:
        model: a Keras model taking ``(B, *patch_size, C)`` (2D or 3D); ignored when ``predict`` is given.
        image: the prepared volume.
        patch_size: ``(H, W)`` for 2D models, ``(D, H, W)`` for 3D models.
        num_classes: ``K``.
        overlap, blend, batch_size: see :func:`sliding_window`.
        tta: average over all mirror combinations of the spatial axes.
        progress: progress bar over windows.
        predict: optional ``batch -> probabilities`` function used instead of ``model``.
    """
    predict = predict or model_predictor(model)
    ndim = len(patch_size)
    if ndim not in (2, 3):
        raise ValueError(f"patch size must have 2 or 3 entries, got {tuple(patch_size)}")
    if tta:
        predict = mirrored(predict, tuple(range(1, ndim + 1)))
    images = np.asarray(image, dtype=np.float32)
    images = images if ndim == 2 else images[None]
    probabilities = sliding_window(images, predict, patch_size, num_classes, overlap, blend, batch_size, progress)
    return probabilities if ndim == 2 else probabilities[0]

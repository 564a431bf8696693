"""Training batches: random 2D slices or 3D patches read from memory-mapped prepared volumes.

A share of the patches (``foreground_ratio``, one third by default) is centred on a foreground voxel of a class
chosen uniformly among the classes present in the case, so rare classes get their share; the rest are placed
uniformly at random. Volumes smaller than the patch are padded with zeros. Every batch is a pure function of
``(seed, epoch, index)``, so a run is reproducible and a resumed run sees the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import numpy as np

_MAX_LOCATIONS = 5_000


def extract_patch(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Copy ``array[start:start+size]`` over the leading axes, filling with zeros where the window leaves the array.

    Args:
        array: ``(*spatial, ...)``; trailing axes are copied whole.
        start: window start per leading axis (may be negative or run past the end).
        size: window size per leading axis.
    """
    out = np.zeros(tuple(size) + array.shape[len(size) :], dtype=array.dtype)
    src, dst = [], []
    for begin, length, n in zip(start, size, array.shape, strict=False):
        lo, hi = max(begin, 0), min(begin + length, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - begin, hi - begin))
    out[tuple(dst)] = array[tuple(src)]
    return out


def foreground_locations(label: np.ndarray, num_classes: int, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Up to ``5000`` voxel coordinates ``(n, 3)`` of each foreground class present in ``label``."""
    locations = {}
    for k in range(1, num_classes):
        coords = np.argwhere(label == k)
        if len(coords):
            if len(coords) > _MAX_LOCATIONS:
                coords = coords[rng.choice(len(coords), _MAX_LOCATIONS, replace=False)]
            locations[k] = coords.astype(np.int32)
    return locations


def patch_start(shape: Sequence[int], size: Sequence[int], rng: np.random.Generator, centre=None) -> list[int]:
    """Start of a window of ``size`` in a volume of ``shape``: random, or around ``centre`` kept inside the volume.

    Volumes smaller than the window get a centred window (the rest is padding).
    """
    start = []
    for axis, (n, p) in enumerate(zip(shape, size, strict=True)):
        if n <= p:
            start.append(-((p - n) // 2))
        elif centre is None:
            start.append(int(rng.integers(0, n - p + 1)))
        else:
            start.append(int(np.clip(centre[axis] - p // 2 + rng.integers(-(p // 4), p // 4 + 1), 0, n - p)))
    return start


class PatchSampler(keras.utils.PyDataset):
    """Batches ``(x, y)`` of patches: ``x (B, *patch, C)`` float32, ``y (B, *patch, K)`` one-hot float32.

    Args:
        image_loader: ``case_id -> (Z, Y, X, C)`` array (memory-mapped).
        label_loader: ``case_id -> (Z, Y, X)`` integer array (memory-mapped).
        case_ids: training cases.
        patch_size: ``(H, W)`` for 2D models (one slice per sample) or ``(D, H, W)`` for 3D models.
        num_classes: K, including background.
        batch_size: samples per batch.
        steps_per_epoch: batches per epoch.
        foreground_ratio: share of samples centred on foreground.
        augment: ``(image, label, rng) -> (image, label)`` applied per sample, or ``None``.
        seed: random seed.
    """

    def __init__(
        self,
        image_loader: Callable[[str], np.ndarray],
        label_loader: Callable[[str], np.ndarray],
        case_ids: Sequence[str],
        patch_size: Sequence[int],
        num_classes: int,
        batch_size: int = 2,
        steps_per_epoch: int = 250,
        foreground_ratio: float = 0.33,
        augment: Callable | None = None,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not case_ids:
            raise ValueError("the training split is empty: nothing to sample from")
        if len(patch_size) not in (2, 3):
            raise ValueError(f"patch size must have 2 or 3 entries, got {tuple(patch_size)}")
        if not 0.0 <= foreground_ratio <= 1.0:
            raise ValueError(f"foreground ratio must be within [0, 1], got {foreground_ratio}")
        self.image_loader, self.label_loader = image_loader, label_loader
        self.case_ids = list(case_ids)
        self.patch_size = tuple(int(v) for v in patch_size)
        self.window = self.patch_size if len(self.patch_size) == 3 else (1, *self.patch_size)
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.foreground_ratio = foreground_ratio
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        rng = np.random.default_rng([seed, 2**31 - 1])
        self.locations = {c: foreground_locations(np.asarray(label_loader(c)), num_classes, rng) for c in case_ids}

    def __len__(self) -> int:
        return self.steps_per_epoch

    def on_epoch_end(self) -> None:
        self.epoch += 1

    def set_epoch(self, epoch: int) -> None:
        """Continue the sequence of batches at ``epoch`` (used when resuming)."""
        self.epoch = int(epoch)

    def sample(self, rng: np.random.Generator, force_foreground: bool) -> tuple[np.ndarray, np.ndarray]:
        """One ``(image (*patch, C), label (*patch))`` sample."""
        case_id = self.case_ids[int(rng.integers(len(self.case_ids)))]
        image, label = self.image_loader(case_id), self.label_loader(case_id)
        locations = self.locations[case_id]
        centre = None
        if force_foreground and locations:
            classes = sorted(locations)
            coords = locations[classes[int(rng.integers(len(classes)))]]
            centre = coords[int(rng.integers(len(coords)))]
        if len(self.patch_size) == 2:
            z = int(centre[0]) if centre is not None else int(rng.integers(image.shape[0]))
            centre = None if centre is None else (z, *centre[1:])
            start = [z, *patch_start(image.shape[1:3], self.patch_size, rng, None if centre is None else centre[1:])]
        else:
            start = patch_start(image.shape[:3], self.patch_size, rng, centre)
        x = extract_patch(image, start, self.window)
        y = extract_patch(label, start, self.window)
        if len(self.patch_size) == 2:
            x, y = x[0], y[0]
        if self.augment is not None:
            x, y = self.augment(x, y, rng)
        return x, y

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        force = rng.random(self.batch_size) < self.foreground_ratio
        samples = [self.sample(rng, bool(f)) for f in force]
        x = np.stack([s[0] for s in samples]).astype(np.float32)
        labels = np.stack([s[1] for s in samples]).astype(np.int64)
        y = np.eye(self.num_classes, dtype=np.float32)[labels]
        return x, y


def random_flips(axes: Sequence[int] | None = None, probability: float = 0.5) -> Callable:
    """Augmentation that flips image and label together along each spatial axis with ``probability``."""

    def flip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        spatial = range(label.ndim) if axes is None else [a for a in axes if a < label.ndim]
        for axis in spatial:
            if rng.random() < probability:
                image, label = np.flip(image, axis), np.flip(label, axis)
        return np.ascontiguousarray(image), np.ascontiguousarray(label)

    return flip

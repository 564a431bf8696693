"""Training batches: random 2D slices or 3D patches from memory-mapped prepared volumes or exported stacks.

Foreground oversampling: in each batch a share ``foreground_ratio`` of the samples (``floor(B * r)`` of them, plus one
more with probability ``frac(B * r)``, so the expected share is exactly ``r``) is placed on a foreground voxel: a class
is chosen uniformly among the foreground classes present in the case, then one of its voxels, so a rare class (a
tumour inside an organ) gets as many patches as a large one. The voxel lies in the central half of the patch. The
other samples are placed uniformly at random. Volumes smaller than the patch are padded with zeros (the mean of a
z-scored image; background in the label), centred in the patch or, with ``random_padding``, at a random offset.

Determinism: batch ``step`` of epoch ``epoch`` is a pure function of ``(seed, epoch, step, shard)``. The sampler is
an endless :class:`keras.utils.PyDataset`: Keras asks for indices ``0, 1, 2, ...`` across epochs (``fit`` with
``steps_per_epoch``), and index ``i`` is step ``i mod steps`` of epoch ``start_epoch + i // steps``. So batches do
not depend on worker scheduling (``workers``/``use_multiprocessing`` of ``PyDataset``), and a resumed run
(``start_epoch``) sees the batches the uninterrupted run would have seen. ``shard`` separates the data of the
replicas or hosts of a distributed run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import numpy as np

from utils.train.augment import Augmenter, coordinates_of, resample, resample_affine

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
    """Up to ``5000`` voxel coordinates ``(n, label.ndim)`` of each foreground class present in ``label``."""
    locations = {}
    label = np.asarray(label)
    for k in range(1, num_classes):
        coords = np.argwhere(label == k)
        if len(coords):
            if len(coords) > _MAX_LOCATIONS:
                coords = coords[np.sort(rng.choice(len(coords), _MAX_LOCATIONS, replace=False))]
            locations[k] = coords.astype(np.int32)
    return locations


def patch_start(
    shape: Sequence[int],
    size: Sequence[int],
    rng: np.random.Generator,
    centre=None,
    random_padding: bool = False,
    margin: int = 0,
) -> list[int]:
    """Start of a window of ``size`` in a volume of ``shape``: random, or holding ``centre`` in its central half.

    Along an axis where the volume is smaller than the window, the whole volume lies inside the window: centred, or
    with ``random_padding`` at a random offset (as nnU-Net's loader places it), which shifts it within the patch.
    With a ``margin`` (the targets are the window less ``margin`` on each side), ``centre`` lies in the central half
    of the targets.
    """
    start = []
    for axis, (n, p) in enumerate(zip(shape, size, strict=True)):
        jitter = max(p - 2 * margin, 1) // 4
        if n <= p:
            start.append(-int(rng.integers(0, p - n + 1)) if random_padding else -((p - n) // 2))
        elif centre is None:
            start.append(int(rng.integers(0, n - p + 1)))
        else:
            start.append(int(np.clip(centre[axis] - p // 2 + rng.integers(-jitter, jitter + 1), 0, n - p)))
    return start


def foreground_flags(batch_size: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Which samples of a batch are placed on foreground: ``floor(B r)`` plus one with probability ``frac(B r)``."""
    expected = batch_size * ratio
    count = int(expected) + int(rng.random() < expected - int(expected))
    flags = np.zeros(batch_size, dtype=bool)
    flags[rng.permutation(batch_size)[:count]] = True
    return flags


class PatchSampler(keras.utils.PyDataset):
    """Endless batches ``(x, y)``: ``x (B, *patch, C)`` float32, ``y (B, *patch)`` label maps (``uint8`` up to 256
    classes), which the losses and metrics of :mod:`utils.losses` and :mod:`utils.metrics` one-hot encode inside the
    training step; with ``one_hot`` ``y`` is ``(B, *patch, K)`` float32 one-hot. Label maps are 12 times fewer bytes
    than float32 one-hot for three classes, which is most of the cost of handing batches over from worker processes
    (benchmarks/RESULTS.md).

    With ``target_strides`` (deep supervision), ``y`` is a tuple with one target per model output, the truth taken
    every ``stride`` voxels along each axis (nearest, so labels stay labels). With ``target_margin`` (a network of
    valid convolutions, whose output is its input less that many voxels on each side), ``y`` is the centre of the
    patch: ``(B, *(patch - 2 margin))``.

    Args:
        image_loader: ``case_id -> (Z, Y, X, C)`` array (memory-mapped).
        label_loader: ``case_id -> (Z, Y, X)`` integer array (memory-mapped).
        case_ids: training cases.
        patch_size: ``(H, W)`` for 2D models (one slice per sample) or ``(D, H, W)`` for 3D models.
        num_classes: K, including background.
        batch_size: samples per batch.
        steps_per_epoch: batches per epoch.
        foreground_ratio: expected share of samples placed on foreground, in [0, 1].
        augment: an :class:`~utils.train.augment.Augmenter`, any ``(image, label, rng) -> (image, label)`` callable, or
            ``None``.
        seed: random seed.
        start_epoch: the epoch that index 0 belongs to (resuming).
        shard: stream id of this replica or host (0 for a single device).
        target_strides: per model output, the stride of its target (deep supervision), or ``None``.
        random_padding: place a volume smaller than the patch at a random offset inside it (else centred).
        one_hot: yield float32 one-hot targets instead of label maps.
        target_margin: voxels trimmed from each side of the targets (0: the whole patch).
        **kwargs: ``workers``, ``use_multiprocessing``, ``max_queue_size`` of ``keras.utils.PyDataset``.

    Raises:
        ValueError: an empty case list, a patch size of the wrong length, a ratio outside [0, 1].
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
        start_epoch: int = 0,
        shard: int = 0,
        target_strides: Sequence[Sequence[int]] | None = None,
        random_padding: bool = False,
        one_hot: bool = False,
        target_margin: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not case_ids:
            raise ValueError("the training split is empty: nothing to sample from")
        if len(patch_size) not in (2, 3):
            raise ValueError(f"patch size must have 2 or 3 entries, got {tuple(patch_size)}")
        if not 0.0 <= foreground_ratio <= 1.0:
            raise ValueError(f"foreground ratio must be within [0, 1], got {foreground_ratio}")
        if int(batch_size) < 1 or int(steps_per_epoch) < 1:
            raise ValueError(f"batch size and steps per epoch must be at least 1, got {batch_size}, {steps_per_epoch}")
        if not 0 <= int(target_margin) < min(patch_size) / 2:
            raise ValueError(f"target margin {target_margin} leaves no target in a patch of {tuple(patch_size)}")
        self.image_loader, self.label_loader = image_loader, label_loader
        self.case_ids = list(case_ids)
        self.patch_size = tuple(int(v) for v in patch_size)
        self.num_classes = num_classes
        self.batch_size = int(batch_size)
        self.steps_per_epoch = int(steps_per_epoch)
        self.foreground_ratio = float(foreground_ratio)
        self.augment = augment
        self.seed = int(seed)
        self.start_epoch = int(start_epoch)
        self.shard = int(shard)
        self.target_strides = [tuple(s) for s in target_strides] if target_strides else None
        self.random_padding = bool(random_padding)
        self.one_hot = bool(one_hot)
        self.target_margin = int(target_margin)
        rng = np.random.default_rng([self.seed, 2**31 - 1])
        self.locations = {c: foreground_locations(self.label_loader(c), num_classes, rng) for c in self.case_ids}

    @property
    def num_batches(self) -> None:
        """Endless: ``fit`` must be given ``steps_per_epoch``."""
        return None

    def set_epoch(self, epoch: int) -> None:
        """Make index 0 the first batch of ``epoch`` (used when resuming)."""
        self.start_epoch = int(epoch)

    def __getitem__(self, index: int):
        epoch, step = divmod(int(index), self.steps_per_epoch)
        return self.batch(self.start_epoch + epoch, step, self.shard)

    def batch(self, epoch: int, step: int, shard: int = 0):
        """Batch ``step`` of ``epoch`` for stream ``shard``: ``(x, y)`` as described in the class docstring."""
        rng = np.random.default_rng([self.seed, int(epoch), int(step), int(shard)])
        flags = foreground_flags(self.batch_size, self.foreground_ratio, rng)
        samples = [self.sample(rng, bool(flag)) for flag in flags]
        x = np.stack([s[0] for s in samples]).astype(np.float32, copy=False)
        labels = np.stack([s[1] for s in samples])
        return x, self.targets(labels)

    def targets(self, labels: np.ndarray):
        """Label maps ``(B, *patch)`` (one-hot ``(B, *patch, K)`` with ``one_hot``; less ``target_margin`` on each
        side), or a tuple of them at each output's stride."""
        eye = np.eye(self.num_classes, dtype=np.float32)
        dtype = np.uint8 if self.num_classes <= 256 else np.int32

        def encode(array: np.ndarray) -> np.ndarray:
            return eye[array.astype(np.intp)] if self.one_hot else array.astype(dtype, copy=False)

        if self.target_margin:
            m = self.target_margin
            labels = labels[(slice(None), *(slice(m, -m) for _ in self.patch_size))]
        if not self.target_strides:
            return encode(labels)
        return tuple(
            encode(labels[(slice(None), *(slice(None, None, s) for s in stride))]) for stride in self.target_strides
        )

    def _case(self, rng: np.random.Generator, force_foreground: bool):
        case_id = self.case_ids[int(rng.integers(len(self.case_ids)))]
        locations = self.locations[case_id]
        centre = None
        if force_foreground and locations:
            classes = sorted(locations)
            coords = locations[classes[int(rng.integers(len(classes)))]]
            centre = coords[int(rng.integers(len(coords)))]
        return case_id, centre

    def sample(self, rng: np.random.Generator, force_foreground: bool) -> tuple[np.ndarray, np.ndarray]:
        """One ``(image (*patch, C), label (*patch))`` sample, augmented."""
        case_id, centre = self._case(rng, force_foreground)
        image, label = self.image_loader(case_id), self.label_loader(case_id)
        if len(self.patch_size) == 2:
            z = int(centre[0]) if centre is not None else int(rng.integers(image.shape[0]))
            image, label = image[z], label[z]
            centre = None if centre is None else centre[1:]
        return self.crop(image, label, centre, rng)

    def crop(self, image, label, centre, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A patch of ``image (*spatial, C)`` / ``label (*spatial)``, spatially augmented while it is read."""
        start = patch_start(label.shape, self.patch_size, rng, centre, self.random_padding, self.target_margin)
        augmenter = self.augment if isinstance(self.augment, Augmenter) else None
        transform = augmenter.spatial_transform(self.patch_size, rng) if augmenter else None
        if transform is None:
            x, y = extract_patch(image, start, self.patch_size), extract_patch(label, start, self.patch_size)
        elif transform[1] is None:  # rotation and scaling only
            x, y = read_affine(image, label, start, self.patch_size, transform[0], augmenter.image_order)
        else:
            coordinates = coordinates_of(transform, self.patch_size)
            x, y = read_transformed(image, label, start, self.patch_size, coordinates, augmenter.image_order)
        if augmenter is not None:
            return augmenter.after_spatial(x, y, rng)
        if self.augment is not None:
            return self.augment(x, y, rng)
        return np.asarray(x, dtype=np.float32), np.asarray(y)


def _covering_window(image, label, points: np.ndarray):
    """The window of ``image`` (as float32) and ``label`` that covers ``points`` (``(ndim, n)`` voxel positions) with
    one voxel to spare for interpolation, zero outside the volume; and its lowest corner."""
    low = np.floor(points.min(axis=1)).astype(int) - 1
    high = np.ceil(points.max(axis=1)).astype(int) + 2
    window_x = extract_patch(image, low, high - low).astype(np.float32, copy=False)
    return window_x, extract_patch(label, low, high - low), low


def read_transformed(image, label, start, size, coordinates: np.ndarray, image_order: int):
    """Resample the patch at ``start`` of ``size`` through ``coordinates`` (relative to its centre), reading only the
    window those coordinates cover (zero outside the volume)."""
    ndim = len(size)
    centre = np.array([s + (p - 1) / 2 for s, p in zip(start, size, strict=True)]).reshape(-1, *([1] * ndim))
    absolute = coordinates + centre
    window_x, window_y, low = _covering_window(image, label, absolute.reshape(ndim, -1))
    local = absolute - low.reshape(-1, *([1] * ndim))
    return resample(window_x, local, image_order, True), resample(window_y, local, 0, False)


def read_affine(image, label, start, size, matrix: np.ndarray, image_order: int):
    """:func:`read_transformed` for an affine transform (``matrix`` about the patch centre): the window is bounded by
    the transformed corners of the patch and resampled without a coordinate grid."""
    ndim = len(size)
    half = np.array([(p - 1) / 2 for p in size])
    centre = np.asarray(start, dtype=float) + half
    corners = np.array(np.meshgrid(*[(-h, h) for h in half], indexing="ij")).reshape(ndim, -1)
    window_x, window_y, low = _covering_window(image, label, matrix @ corners + centre[:, None])
    offset = centre - low - matrix @ half
    return (
        resample_affine(window_x, matrix, offset, size, image_order, True),
        resample_affine(window_y, matrix, offset, size, 0, False),
    )


class StackSampler(PatchSampler):
    """Batches from exported stacks (``data_gen.py --export``): ``slices/<split>_images.npy (N, H, W, C)`` with
    ``_labels.npy (N, H, W)``, or ``patches/<split>_images.npy (N, D, H, W, C)`` with labels.

    Each sample is a row (a row holding the chosen foreground class when the sample is placed on foreground),
    cropped to ``patch_size`` (padded where the row is smaller). Arguments as :class:`PatchSampler`, with
    ``images``/``labels`` (memory-mapped) in place of the loaders and case ids.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, patch_size: Sequence[int], num_classes: int, **kwargs):
        if images.ndim != labels.ndim + 1 or images.shape[:-1] != labels.shape:
            raise ValueError(f"stack images {images.shape} and labels {labels.shape} do not match")
        if labels.ndim - 1 != len(patch_size):
            raise ValueError(f"rows of shape {labels.shape[1:]} do not fit a patch size of {len(patch_size)} axes")
        self.images, self.labels = images, labels
        rows = [str(i) for i in range(len(labels))]
        super().__init__(self._row_image, self._row_label, rows, patch_size, num_classes, **kwargs)

    def _row_image(self, row: str) -> np.ndarray:
        return self.images[int(row)]

    def _row_label(self, row: str) -> np.ndarray:
        return self.labels[int(row)]

    def _case(self, rng: np.random.Generator, force_foreground: bool):
        if not (force_foreground and self.rows_with):
            return self.case_ids[int(rng.integers(len(self.case_ids)))], None
        k = sorted(self.rows_with)[int(rng.integers(len(self.rows_with)))]
        rows = self.rows_with[k]
        row = self.case_ids[int(rows[int(rng.integers(len(rows)))])]
        coords = self.locations[row][k]
        return row, coords[int(rng.integers(len(coords)))]

    @property
    def rows_with(self) -> dict[int, np.ndarray]:
        if not hasattr(self, "_rows_with"):
            by_class: dict[int, list[int]] = {}
            for i, row in enumerate(self.case_ids):
                for k in self.locations[row]:
                    by_class.setdefault(k, []).append(i)
            self._rows_with = {k: np.asarray(v) for k, v in by_class.items()}
        return self._rows_with

    def sample(self, rng: np.random.Generator, force_foreground: bool) -> tuple[np.ndarray, np.ndarray]:
        row, centre = self._case(rng, force_foreground)
        return self.crop(self._row_image(row), self._row_label(row), centre, rng)

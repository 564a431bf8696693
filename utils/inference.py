"""Whole-volume inference: sliding windows with Gaussian or constant blending and optional mirroring (TTA).

One function, :func:`predict_volume`, serves validation in ``train.py`` and ``evaluation.py``. 2D models see every
slice (axis 0) of the volume, windows tiled over ``(Y, X)`` and batched across slices; 3D models see windows tiled
over ``(Z, Y, X)``. Windows overlap by ``overlap`` of the patch size; each prediction is weighted by a Gaussian
importance map (sigma = patch / 8, as in nnU-Net) or uniformly, and the weighted predictions are averaged. A Keras
model is called through its compiled predict function, or eagerly when the caller says it lives under a distribution
strategy (``distributed``: validation while training with ``--strategy mirrored|multiworker``). Any other engine
plugs in as a ``batch -> probabilities`` callable (``predict``): :func:`onnx_predictor` runs an exported bundle's
ONNX network with onnxruntime through the same windows, weights and mirroring.

Networks of valid convolutions (the two-path CNN as trained, :data:`utils.settings.WHOLE_SLICE_MODELS`) return the
centre of their input, ``margin`` voxels less on each side. The sliding window then pads the image by the margin
(zeros, as a same-padded network pads) and tiles the *outputs*: each window reads its output tile plus the margin
around it, so every voxel is predicted from its real neighbourhood and the result equals whole-input prediction;
such tiles do not overlap (their outputs would be the same). :func:`model_predictor` pads a batch by the margin for
callers that want an output of the input's size.

Memory: the importance map is separable and the windows form a grid, so the summed weight at every voxel is a product
of one-dimensional sums. Each window's prediction is therefore multiplied by its *normalised* weight (its weight
divided by that sum, a value in [0, 1]) and added straight into the output, which holds the finished probabilities
when the last window is in: no volume of summed weights, no final division. Windows are taken row by row along Z
(:func:`sliding_window_slabs`), so a plane is final once the row of windows over it is in: the finished planes are
handed over as slabs and only the float32 planes of the current row are held. :func:`predict_labels` arg-maxes
(and resamples, :class:`LabelSlabs`) each slab as it comes, so ``evaluation.py`` never holds the probabilities of a
volume (a 512 x 512 x 512 CT, 3 classes: 1.7 GB peak with TensorFlow and a one-layer network; see
``benchmarks/RESULTS.md``).
Callers that want the whole probabilities (:func:`predict_volume`: validation, ``--save-probabilities``, fold
ensembles) get float32, or float16 when float32 would exceed :data:`FLOAT16_ABOVE_BYTES` (a 512 x 512 x 300 CT with
3 classes then needs 0.47 GB instead of 0.94 GB; each voxel sums at most 8 weighted windows at overlap 0.5, so
float16 keeps the probabilities within about 2e-3, which moves an arg-max only at near-ties). The input may be a
memory-mapped array; windows are read from it one batch at a time.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from utils.geometry import resize_volume
from utils.settings import BLENDS

FLOAT16_ABOVE_BYTES = 512 * 1024**2


def importance_profile(size: int, blend: str = "gaussian", sigma_scale: float = 1 / 8) -> np.ndarray:
    """Weights along one axis of a window: a Gaussian with ``sigma = size * sigma_scale`` (max 1) or ones.

    Raises:
        ValueError: an unknown ``blend``.
    """
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    if blend == "constant":
        return np.ones(size, dtype=np.float64)
    centre, sigma = (size - 1) / 2.0, max(size * sigma_scale, 1e-6)
    profile = np.exp(-0.5 * ((np.arange(size) - centre) / sigma) ** 2)
    return profile / profile.max()


def _outer(vectors: Sequence[np.ndarray]) -> np.ndarray:
    out = np.ones((), dtype=np.float64)
    for vector in vectors:
        out = np.multiply.outer(out, vector)
    return out


def importance_map(patch_size: Sequence[int], blend: str = "gaussian", sigma_scale: float = 1 / 8) -> np.ndarray:
    """Weights of one window: the outer product of :func:`importance_profile` per axis (max 1, no zeros) or ones."""
    return _outer([importance_profile(p, blend, sigma_scale) for p in patch_size]).astype(np.float32)


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
            out = np.asarray(predict(np.ascontiguousarray(flipped)), dtype=np.float32)
            out = np.flip(out, axes) if axes else out
            total = out if total is None else total + out
        return total / len(combos)

    return predict_mirrored


def _normalised_weights(size: int, patch: int, starts: Sequence[int], profile: np.ndarray) -> list[np.ndarray]:
    """Per window start, ``profile`` divided by the summed profiles of all windows along this axis."""
    total = np.zeros(size, dtype=np.float64)
    for start in starts:
        total[start : start + patch] += profile
    return [profile / total[start : start + patch] for start in starts]


def output_dtype(shape: Sequence[int], dtype: str | None = None) -> np.dtype:
    """``dtype`` if given, else float32, or float16 when a float32 array of ``shape`` exceeds 512 MiB
    (:data:`FLOAT16_ABOVE_BYTES`).

    Raises:
        ValueError: a dtype other than float32 or float16.
    """
    if dtype is None:
        dtype = "float16" if 4 * math.prod(shape) > FLOAT16_ABOVE_BYTES else "float32"
    if np.dtype(dtype) not in (np.float32, np.float16):
        raise ValueError(f"output dtype must be float32 or float16, got {dtype!r}")
    return np.dtype(dtype)


def sliding_window_slabs(
    images: np.ndarray,
    predict: Callable[[np.ndarray], np.ndarray],
    patch_size: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    blend: str = "gaussian",
    batch_size: int = 4,
    progress: bool = False,
    margin: int = 0,
    along_inputs: bool | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """:func:`sliding_window`, handing over its output in finished slabs instead of one array.

    Windows are taken in order along the *streaming axis*: the inputs (the slices of a 2D model's volume, or a batch)
    when ``along_inputs`` is true, else the first spatial axis (``None``: the inputs when there are several, the first
    spatial axis of a single input such as a 3D volume). Once every window that reaches a plane is in, the plane is
    final: it is yielded and its memory reused. Only the planes under the current row of windows are ever held, as
    float32, so the memory does not grow with the length of the streaming axis.

    Yields:
        ``(start, block)`` in order, the blocks covering the streaming axis once: along the inputs, ``block`` is inputs
        ``start:start + len(block)`` of the output ``(N, *spatial, K)``; along the first spatial axis (one input), it
        is planes ``start: ...`` of the output ``(*spatial, K)``. ``block`` is a view, valid until the next one is
        requested.

    Raises:
        ValueError: see :func:`sliding_window`.
    """
    spatial = images.shape[1:-1]
    if len(spatial) != len(patch_size):
        raise ValueError(f"patch size {tuple(patch_size)} does not match the input's spatial shape {spatial}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    tile = [int(p) - 2 * int(margin) for p in patch_size]
    if min(tile) < 1:
        raise ValueError(f"a margin of {margin} leaves no output in a window of {tuple(patch_size)}")
    overlap = 0.0 if margin else overlap
    pad = [max(0, t - s) for s, t in zip(spatial, tile, strict=True)]
    padding = [(d // 2, d - d // 2) for d in pad]
    if any(pad) or margin:
        images = np.pad(images, [(0, 0), *((lo + margin, hi + margin) for lo, hi in padding), (0, 0)])
    padded = [s + d for s, d in zip(spatial, pad, strict=True)]
    starts = [window_starts(s, t, overlap) for s, t in zip(padded, tile, strict=True)]
    weights = [
        dict(zip(axis_starts, _normalised_weights(size, t, axis_starts, importance_profile(t, blend)), strict=True))
        for size, t, axis_starts in zip(padded, tile, starts, strict=True)
    ]
    jobs = [(n, s) for n in range(images.shape[0]) for s in itertools.product(*starts)]
    planes = images.shape[0] == 1 if along_inputs is None else not along_inputs  # stream along spatial axis 0
    if planes and images.shape[0] != 1:
        raise ValueError(f"streaming along the first spatial axis needs one input, got {images.shape[0]}")
    if planes:  # a batch never spans two rows of windows, so a row's planes are all the buffer holds
        rows = [list(group) for _, group in itertools.groupby(jobs, key=lambda job: job[1][0])]
        batches = [row[i : i + batch_size] for row in rows for i in range(0, len(row), batch_size)]
        length, rest, extent, (lo, _), real = padded[0], padded[1:], tile[0], padding[0], spatial[0]
        crop = tuple(slice(a, a + s) for (a, _), s in zip(padding[1:], spatial[1:], strict=True))
    else:
        batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
        length, rest, extent, lo, real = images.shape[0], padded, 1, 0, images.shape[0]
        crop = tuple(slice(a, a + s) for (a, _), s in zip(padding, spatial, strict=True))
    buffer = np.zeros((min(length, extent + (batch_size if not planes else 0)), *rest, num_classes), np.float32)
    base = 0  # the streaming-axis position of buffer[0]
    bar = tqdm(total=len(jobs), desc="windows", unit="win", leave=False, disable=not progress, dynamic_ncols=True)
    for number, chunk in enumerate(batches):
        batch = np.stack([np.asarray(images[(n, *_window(s, patch_size))], dtype=np.float32) for n, s in chunk])
        probabilities = np.asarray(predict(batch), dtype=np.float32)
        if probabilities.shape != (len(chunk), *tile, num_classes):
            raise ValueError(
                f"predict returned shape {probabilities.shape}, expected {(len(chunk), *tile, num_classes)}"
            )
        for (n, s), prob in zip(chunk, probabilities, strict=True):
            weighted = prob * _outer([weights[axis][a] for axis, a in enumerate(s)]).astype(np.float32)[..., None]
            first, inner = (s[0], _window(s[1:], tile[1:])) if planes else (n, _window(s, tile))
            if first + extent - base > len(buffer):  # only with several inputs: a batch longer than expected
                buffer = np.concatenate(
                    [buffer, np.zeros((first + extent - base - len(buffer), *buffer.shape[1:]), np.float32)]
                )
            target = buffer[(slice(first - base, first - base + extent), *inner)]
            target += weighted if planes else weighted[None]
        bar.update(len(chunk))
        following = batches[number + 1][0] if number + 1 < len(batches) else None
        done = length if following is None else (following[1][0] if planes else following[0])
        if done > base:  # planes base:done are final
            a, b = max(base, lo) - lo, min(done, lo + real) - lo
            if b > a:
                yield a, buffer[(slice(a + lo - base, b + lo - base), *crop)]
            shift = done - base
            if shift < len(buffer):
                buffer[: len(buffer) - shift] = buffer[shift:]
                buffer[len(buffer) - shift :] = 0
            else:
                buffer[:] = 0
            base = done
    bar.close()


def sliding_window(
    images: np.ndarray,
    predict: Callable[[np.ndarray], np.ndarray],
    patch_size: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    blend: str = "gaussian",
    batch_size: int = 4,
    progress: bool = False,
    dtype: str | None = None,
    margin: int = 0,
) -> np.ndarray:
    """Tile windows over ``images`` ``(N, *spatial, C)`` and blend ``predict``'s outputs into ``(N, *spatial, K)``.

    Args:
        images: ``N`` independent inputs (the slices of a volume for 2D, one volume for 3D); may be memory-mapped.
        predict: maps a batch ``(B, *patch, C)`` to probabilities ``(B, *patch, K)``.
        patch_size: the window, one entry per spatial axis.
        num_classes: ``K``.
        overlap: fraction of the window shared by neighbours, in [0, 1).
        blend: ``gaussian`` or ``constant``.
        batch_size: windows per call of ``predict``; windows of several inputs share a batch.
        progress: show a progress bar over windows.
        dtype: ``float32``, ``float16`` or ``None`` (:func:`output_dtype` decides by size).
        margin: ``predict`` returns the centre of each window, ``margin`` voxels less on each side (a network of
            valid convolutions); the image is padded by it and the output tiles do not overlap.

    Returns:
        Probabilities ``(N, *spatial, K)`` of ``dtype``, assembled from :func:`sliding_window_slabs`.

    Raises:
        ValueError: a patch size whose length differs from the number of spatial axes, or a bad option.
    """
    slabs = sliding_window_slabs(images, predict, patch_size, num_classes, overlap, blend, batch_size, progress, margin)
    return _assemble(slabs, (*images.shape[:-1], num_classes), dtype, planes=images.shape[0] == 1)


def _assemble(slabs: Iterator[tuple[int, np.ndarray]], shape: Sequence[int], dtype: str | None, planes: bool):
    """One array ``(N, *spatial, K)`` of :func:`output_dtype` from the ``(start, block)`` slabs of
    :func:`sliding_window_slabs`, which are planes of the one input when ``planes``, else inputs."""
    output = np.zeros(shape, dtype=output_dtype(shape, dtype))
    stream = output[0] if planes else output
    for start, block in slabs:
        stream[start : start + len(block)] = block
    return output


def _window(start: Sequence[int], size: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(a, a + n) for a, n in zip(start, size, strict=True))


def model_margin(model) -> int:
    """Voxels a Keras model trims from each side of its input (a network of valid convolutions), from its static
    shapes; 0 when they are equal or unknown (or ``model`` has no symbolic inputs and outputs)."""
    if not getattr(model, "inputs", None) or not getattr(model, "outputs", None):
        return 0
    inputs, outputs = model.inputs[0].shape[1:-1], model.outputs[0].shape[1:-1]
    if None in inputs or None in outputs or len(inputs) != len(outputs):
        return 0
    margins = {(int(i) - int(o)) // 2 for i, o in zip(inputs, outputs, strict=True)}
    return margins.pop() if len(margins) == 1 and min(margins) > 0 else 0


def model_predictor(model, distributed: bool = False, same_size: bool = True) -> Callable[[np.ndarray], np.ndarray]:
    """``batch -> probabilities`` for a Keras model (first output of deep-supervision models), as float32 numpy.

    Batches go through ``model.predict_on_batch``, Keras's compiled predict function (traced once per batch size,
    so at most ``batch_size`` traces per run): 1.4 to 1.9 times faster than calling the model eagerly on a CPU
    (benchmarks/RESULTS.md).

    Args:
        model: a Keras model taking ``(B, *patch, C)``.
        distributed: the model was built under a ``tf.distribute`` strategy or a Keras distribution (training with
            ``--strategy mirrored|multiworker``): it is then called eagerly, since its compiled step would split the
            batch over the devices. The caller that set up the distribution says so.
        same_size: for a network of valid convolutions (:func:`model_margin`), return outputs of the batch's size:
            each sample is padded by the margin with zeros, as a same-padded network would pad it, and predicted in
            output tiles (:func:`sliding_window`); ``False`` returns the network's output, the centre of the batch.
    """
    import keras

    def predict(batch: np.ndarray) -> np.ndarray:
        out = model(batch, training=False) if distributed else model.predict_on_batch(batch)
        if isinstance(out, list | tuple):
            out = out[0]
        return np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float32)

    margin = model_margin(model) if same_size else 0
    if not margin:
        return predict
    window, classes = tuple(model.inputs[0].shape[1:-1]), int(model.outputs[0].shape[-1])

    def predict_same_size(batch: np.ndarray) -> np.ndarray:
        return sliding_window(batch, predict, window, classes, batch_size=len(batch), dtype="float32", margin=margin)

    return predict_same_size


def onnx_predictor(path, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """``batch -> probabilities`` for an ONNX network (a bundle's ``model.onnx``) run by onnxruntime on the CPU: the
    engine seam of :func:`predict_volume` (its ``predict``), so the same sliding window serves every engine.

    Args:
        path: the ``.onnx`` file; its first input takes ``(B, *window, C)`` float32, its first output is the
            probabilities ``(B, *window, K)``.
        threads: onnxruntime's intra-op threads (``None``: its default, one per core).

    Raises:
        FileNotFoundError: no such file.
        ValueError: onnxruntime is not installed or cannot load the file.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: ONNX model not found")
    try:
        import onnxruntime
    except ImportError as error:
        raise ValueError(f"{path}: --engine onnx needs onnxruntime (pip install onnxruntime)") from error
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own types for damaged or unsupported files
        raise ValueError(f"{path}: not a loadable ONNX model ({type(error).__name__}: {error})") from error
    name = session.get_inputs()[0].name

    def predict(batch: np.ndarray) -> np.ndarray:
        out = session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float32)

    return predict


def whole_slice_network(network, name: str, model_args: dict, num_channels: int, num_classes: int):
    """A network trained on patches of its receptive field (:data:`utils.settings.WHOLE_SLICE_MODELS`) rebuilt for
    ``(None, None, C)`` slices with same padding (its valid convolutions padded by half the receptive field, with
    zeros) and the trained weights: output ``(B, H, W, K)`` for any slice."""
    import model as model_zoo

    args = {**model_args, "padding": "same"}
    whole = model_zoo.build_model(name, (None, None, num_channels), num_classes, **args)
    whole.set_weights(network.get_weights())
    return whole


def predict_volume(
    model,
    image: np.ndarray,
    patch_size: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    blend: str = "gaussian",
    batch_size: int = 4,
    tta: bool | Sequence[int] = False,
    progress: bool = False,
    predict: Callable[[np.ndarray], np.ndarray] | None = None,
    dtype: str | None = None,
    distributed: bool = False,
    margin: int | None = None,
) -> np.ndarray:
    """Class probabilities ``(Z, Y, X, K)`` for a prepared image ``(Z, Y, X, C)``.

    Args:
        model: a Keras model taking ``(B, *patch_size, C)`` (2D or 3D); ignored when ``predict`` is given.
        image: the prepared volume (a memory-mapped array is read window by window).
        patch_size: ``(H, W)`` for 2D models, ``(D, H, W)`` for 3D models.
        num_classes: ``K``.
        overlap, blend, batch_size, dtype: see :func:`sliding_window`.
        tta: test-time mirroring: ``True`` averages over all mirror combinations of the spatial axes (4 for 2D, 8
            for 3D); a list of spatial axes (0 is the first patch axis) over the combinations of those.
        progress: progress bar over windows.
        predict: optional ``batch -> probabilities`` function used instead of ``model``.
        distributed: ``model`` lives under a distribution strategy (see :func:`model_predictor`).
        margin: voxels ``predict`` trims from each side of a window (see :func:`sliding_window`); ``None``: the
            model's (:func:`model_margin`), or 0 with ``predict``. A 2D model that takes any input size, given the
            whole slice as ``patch_size``, predicts whole slices.

    Raises:
        ValueError: a patch size of other than 2 or 3 entries, or an image that is not ``(Z, Y, X, C)``.
    """
    slabs = predict_volume_slabs(
        model, image, patch_size, num_classes, overlap, blend, batch_size, tta, progress, predict, distributed, margin
    )
    three_d = len(patch_size) == 3
    shape = (1, *image.shape[:3], num_classes) if three_d else (*image.shape[:3], num_classes)
    probabilities = _assemble(slabs, shape, dtype, planes=three_d)
    return probabilities[0] if three_d else probabilities


def predict_volume_slabs(
    model,
    image: np.ndarray,
    patch_size: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    blend: str = "gaussian",
    batch_size: int = 4,
    tta: bool | Sequence[int] = False,
    progress: bool = False,
    predict: Callable[[np.ndarray], np.ndarray] | None = None,
    distributed: bool = False,
    margin: int | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """:func:`predict_volume` handed over in finished slabs ``(start, probabilities[start : start + n])`` along Z,
    in order (:func:`sliding_window_slabs`): float32 views, valid until the next slab is requested.

    Raises:
        ValueError: as :func:`predict_volume`, when called (not when the first slab is requested).
    """
    ndim = len(patch_size)
    if ndim not in (2, 3):
        raise ValueError(f"patch size must have 2 or 3 entries, got {tuple(patch_size)}")
    if image.ndim != 4:
        raise ValueError(f"image must be (Z, Y, X, C), got shape {tuple(image.shape)}")
    if margin is None:
        margin = model_margin(model) if predict is None else 0
    predict = predict or model_predictor(model, distributed, same_size=False)
    axes = range(ndim) if tta is True else (tta or ())
    if any(not 0 <= int(a) < ndim for a in axes):
        raise ValueError(f"test-time mirroring axes {list(axes)} are not spatial axes of a {ndim}D patch")
    if axes:
        predict = mirrored(predict, tuple(int(a) + 1 for a in axes))
    images = image if ndim == 2 else image[None]
    return sliding_window_slabs(
        images, predict, patch_size, num_classes, overlap, blend, batch_size, progress, margin, along_inputs=ndim == 2
    )


class LabelSlabs:
    """Arg-max labels of ``shape`` from probabilities on a grid of ``source_shape`` (same field of view), fed one slab
    of finished planes at a time in order along Z (:meth:`add`), so that neither grid's probabilities are ever held
    whole.

    The resampling is linear with voxel edges aligned and edge values repeated (that of
    :func:`utils.geometry.resize_volume`): linear interpolation is separable, so each slab is resampled in-plane
    when it comes, and each output plane is then interpolated from the two in-plane-resampled source planes around
    it; only those not yet used are kept. The labels equal those of resampling the whole array, then taking the
    arg-max (up to float rounding at exact ties).
    """

    def __init__(self, source_shape: Sequence[int], shape: Sequence[int], num_classes: int):
        self.source_shape = tuple(int(n) for n in source_shape[:3])
        self.shape = tuple(int(n) for n in shape)
        self.labels = np.zeros(self.shape, dtype=np.uint8 if num_classes < 256 else np.uint16)
        depth, target = self.source_shape[0], self.shape[0]
        position = np.clip((np.arange(target) + 0.5) * depth / target - 0.5, 0, depth - 1)
        self.below = np.floor(position).astype(np.int64)
        self.above = np.minimum(self.below + 1, depth - 1)
        self.weight = position - self.below
        self.planes: dict[int, np.ndarray] = {}
        self.received = 0
        self.done = 0

    def add(self, start: int, block: np.ndarray) -> None:
        """Source planes ``start : start + len(block)`` ``(n, Y, X, K)``, given in order.

        Raises:
            ValueError: a slab out of order or of another in-plane shape.
        """
        if start != self.received or tuple(block.shape[1:3]) != self.source_shape[1:]:
            raise ValueError(
                f"slab at plane {start} of shape {tuple(block.shape)}: expected plane {self.received} of "
                f"{self.source_shape[1:]} planes"
            )
        self.received += len(block)
        if self.source_shape == self.shape:
            self.labels[start : self.received] = np.argmax(block, axis=-1)
            self.done = self.received
            return
        in_plane = (len(block), *self.shape[1:])
        for index, plane in enumerate(self._in_plane(block, in_plane), start=start):
            self.planes[index] = plane
        while self.done < self.shape[0] and self.above[self.done] < self.received:
            z, w = self.done, float(self.weight[self.done])
            plane = self.planes[self.below[z]]
            if w > 0:
                plane = (1 - w) * plane + w * self.planes[self.above[z]]
            self.labels[z] = np.argmax(plane, axis=-1)
            self.done += 1
        keep_from = self.below[self.done] if self.done < self.shape[0] else self.received
        for index in [i for i in self.planes if i < keep_from]:
            del self.planes[index]

    @staticmethod
    def _in_plane(block: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """``block`` ``(n, Y, X, K)`` resampled to ``shape`` ``(n, Y', X')`` one class at a time."""
        out = np.empty((*shape, block.shape[-1]), dtype=np.float32)
        for k in range(block.shape[-1]):
            out[..., k] = resize_volume(np.asarray(block[..., k], dtype=np.float32), shape, 1)
        return out

    def result(self) -> np.ndarray:
        """The label map, once every source plane was added.

        Raises:
            ValueError: planes are missing.
        """
        if self.received != self.source_shape[0]:
            raise ValueError(f"only {self.received} of {self.source_shape[0]} planes were added")
        return self.labels


def probabilities_to_labels(probabilities: np.ndarray, shape: Sequence[int], slab: int = 16) -> np.ndarray:
    """Arg-max class map ``shape`` of probabilities ``(Z, Y, X, K)`` resampled linearly onto ``shape`` (same field of
    view), ``slab`` planes at a time (:class:`LabelSlabs`): memory holds the labels and a few resampled planes, never
    a resampled volume. Gives the same labels as resampling the whole array, then taking the arg-max.

    Returns:
        ``shape`` uint8 (uint16 above 255 classes) label map.
    """
    labels = LabelSlabs(probabilities.shape, shape, probabilities.shape[-1])
    for start in range(0, probabilities.shape[0], slab):
        labels.add(start, probabilities[start : start + slab])
    return labels.result()


def predict_labels(
    model, image: np.ndarray, patch_size: Sequence[int], num_classes: int, shape: Sequence[int], **options
) -> np.ndarray:
    """:func:`probabilities_to_labels` of :func:`predict_volume` without ever holding the probabilities whole: the
    windows' output is arg-maxed (and resampled to ``shape``) one finished slab at a time (:class:`LabelSlabs`,
    :func:`sliding_window_slabs`). For a 512 x 512 x 512 CT with 3 classes that keeps the planes of one row of
    windows (about 120 MB for windows 40 deep) instead of 768 MB of float16 probabilities.

    Args:
        model, image, patch_size, num_classes: see :func:`predict_volume`.
        shape: ``(Z, Y, X)`` of the labels (the image's own for no resampling).
        options: the keyword arguments of :func:`predict_volume` but ``dtype``.
    """
    labels = LabelSlabs(image.shape[:3], shape, num_classes)
    for start, block in predict_volume_slabs(model, image, patch_size, num_classes, **options):
        labels.add(start, block)
    return labels.result()

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
when the last window is in: no second volume of summed weights, no final division. The output is float32, or float16
when float32 would exceed :data:`FLOAT16_ABOVE_BYTES` (a 512 x 512 x 300 CT with 3 classes then needs 0.47 GB instead
of 0.94 GB; each voxel sums at most 8 weighted windows at overlap 0.5, so float16 keeps the probabilities within
about 2e-3, which moves an arg-max only at near-ties). The input may be a memory-mapped array; windows are read from
it one batch at a time.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

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
        Probabilities ``(N, *spatial, K)`` of ``dtype``.

    Raises:
        ValueError: a patch size whose length differs from the number of spatial axes, or a bad option.
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
    output = np.zeros(
        (images.shape[0], *padded, num_classes), dtype=output_dtype((images.shape[0], *padded, num_classes), dtype)
    )
    jobs = [(n, s) for n in range(images.shape[0]) for s in itertools.product(*starts)]
    bar = tqdm(total=len(jobs), desc="windows", unit="win", leave=False, disable=not progress, dynamic_ncols=True)
    for begin in range(0, len(jobs), batch_size):
        chunk = jobs[begin : begin + batch_size]
        batch = np.stack([np.asarray(images[(n, *_window(s, patch_size))], dtype=np.float32) for n, s in chunk])
        probabilities = np.asarray(predict(batch), dtype=np.float32)
        if probabilities.shape != (len(chunk), *tile, num_classes):
            raise ValueError(
                f"predict returned shape {probabilities.shape}, expected {(len(chunk), *tile, num_classes)}"
            )
        for (n, s), prob in zip(chunk, probabilities, strict=True):
            weight = _outer([weights[axis][a] for axis, a in enumerate(s)]).astype(np.float32)
            output[(n, *_window(s, tile))] += prob * weight[..., None]
        bar.update(len(chunk))
    bar.close()
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(padding, spatial, strict=True))
    return output[(slice(None), *crop)] if any(pad) else output


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
    probabilities = sliding_window(
        images, predict, patch_size, num_classes, overlap, blend, batch_size, progress, dtype, margin
    )
    return probabilities if ndim == 2 else probabilities[0]


def probabilities_to_labels(probabilities: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Arg-max class map ``shape`` of probabilities ``(Z, Y, X, K)`` resampled linearly onto ``shape`` (same field of
    view), one class at a time: memory holds one resampled class, the running maximum and the labels, never all
    ``K`` resampled classes. Gives the same labels as resampling the whole array, then taking the arg-max.

    Returns:
        ``shape`` uint8 (uint16 above 255 classes) label map.
    """
    from utils.geometry import resize_volume

    shape = tuple(int(n) for n in shape)
    num_classes = probabilities.shape[-1]
    labels = np.zeros(shape, dtype=np.uint8 if num_classes < 256 else np.uint16)
    if tuple(probabilities.shape[:3]) == shape:
        return np.argmax(probabilities, axis=-1).astype(labels.dtype)
    best = None
    for k in range(num_classes):
        channel = resize_volume(np.asarray(probabilities[..., k], dtype=np.float32), shape, 1)
        if best is None:
            best = channel
            continue
        better = channel > best
        labels[better] = k
        np.maximum(best, channel, out=best)
    return labels

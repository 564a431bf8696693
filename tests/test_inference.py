"""Sliding-window inference: exact reproduction of an identity model, windows, blending, mirroring."""

import itertools
import tracemalloc

import numpy as np
import pytest

from utils.geometry import resize_volume
from utils.inference import (
    LabelSlabs,
    importance_map,
    output_dtype,
    predict_labels,
    predict_volume,
    predict_volume_slabs,
    probabilities_to_labels,
    sliding_window,
    window_starts,
)


def one_hot_identity(num_classes):
    """A 'model' whose output is the one-hot encoding of its (integer-valued) first input channel."""

    def predict(batch):
        return np.eye(num_classes, dtype=np.float32)[batch[..., 0].astype(int)]

    return predict


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("tta", [False, True])
@pytest.mark.parametrize(
    ("shape", "patch"),
    [
        ((7, 13, 11), (8, 8)),  # 2D: slices tiled, one axis smaller than the patch
        ((13, 21, 17), (8, 8, 8)),  # 3D: several windows per axis
        ((5, 6, 7), (8, 8, 8)),  # 3D: volume smaller than the patch (padding)
    ],
)
def test_identity_model_is_reproduced_exactly(shape, patch, blend, tta):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=shape)
    image = labels[..., None].astype(np.float32)
    probabilities = predict_volume(
        None, image, patch, 3, overlap=0.5, blend=blend, tta=tta, predict=one_hot_identity(3)
    )
    assert probabilities.shape == (*shape, 3)
    np.testing.assert_allclose(probabilities, np.eye(3)[labels], atol=1e-6)


def test_windows_cover_the_axis_with_the_requested_overlap():
    assert window_starts(10, 16, 0.5) == [0]
    assert window_starts(16, 16, 0.5) == [0]
    starts = window_starts(40, 16, 0.5)
    assert starts[0] == 0 and starts[-1] == 24
    assert all(b - a <= 8 for a, b in zip(starts, starts[1:], strict=False))
    with pytest.raises(ValueError, match="overlap"):
        window_starts(40, 16, 1.0)


def test_gaussian_importance_map_peaks_in_the_centre_and_has_no_zeros():
    weights = importance_map((9, 9), "gaussian")
    assert weights.shape == (9, 9)
    assert weights[4, 4] == pytest.approx(1.0)
    assert weights.min() > 0
    # sigma = 9 / 8: one voxel from the centre along one axis weighs exp(-0.5 / sigma**2)
    assert weights[4, 5] == pytest.approx(np.exp(-0.5 / (9 / 8) ** 2), rel=1e-5)
    np.testing.assert_array_equal(importance_map((3, 4), "constant"), np.ones((3, 4)))


def test_gaussian_blending_weights_window_centres_more():
    """Two windows over 12 voxels predicting constants 0 and 1: at each voxel the nearer window's centre dominates."""
    image = np.zeros((1, 12, 1), dtype=np.float32)
    calls = []

    def predict(batch):
        calls.append(len(calls))
        value = 0.0 if len(calls) == 1 else 1.0
        out = np.zeros((*batch.shape[:-1], 2), dtype=np.float32)
        out[..., 1] = value
        out[..., 0] = 1 - value
        return out

    out = sliding_window(image, predict, (8,), 2, overlap=0.5, blend="gaussian", batch_size=1)
    assert out[0, 2, 1] < 0.5 < out[0, 9, 1]
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.75])
def test_identity_is_reproduced_for_other_overlaps(overlap):
    labels = np.random.default_rng(1).integers(0, 4, size=(11, 30, 23))
    probabilities = predict_volume(
        None, labels[..., None].astype(np.float32), (6, 8, 8), 4, overlap=overlap, predict=one_hot_identity(4)
    )
    np.testing.assert_allclose(probabilities, np.eye(4)[labels], atol=1e-6)


def test_2d_windows_of_several_slices_share_a_batch():
    sizes = []

    def predict(batch):
        sizes.append(batch.shape)
        return one_hot_identity(2)(batch)

    labels = np.random.default_rng(2).integers(0, 2, size=(10, 8, 8))
    out = predict_volume(None, labels[..., None].astype(np.float32), (8, 8), 2, batch_size=4, predict=predict)
    assert sizes == [(4, 8, 8, 1), (4, 8, 8, 1), (2, 8, 8, 1)]
    np.testing.assert_array_equal(out.argmax(-1), labels)


def test_float16_output_agrees_with_float32():
    rng = np.random.default_rng(3)
    image = rng.normal(size=(20, 24, 24, 1)).astype(np.float32)

    def soft(batch):
        logits = np.concatenate([batch, -batch, 0.5 * batch], axis=-1)
        return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)

    full = predict_volume(None, image, (8, 16, 16), 3, predict=soft, dtype="float32")
    half = predict_volume(None, image, (8, 16, 16), 3, predict=soft, dtype="float16")
    assert full.dtype == np.float32 and half.dtype == np.float16
    np.testing.assert_allclose(half, full, atol=2e-3)


def test_output_dtype_switches_to_float16_for_large_outputs():
    assert output_dtype((128, 512, 512, 3)) == np.float32  # 0.40 GB
    assert output_dtype((300, 512, 512, 3)) == np.float16  # 0.94 GB in float32, 0.47 GB in float16
    with pytest.raises(ValueError, match="float32 or float16"):
        output_dtype((2, 2), "int8")


def test_peak_memory_is_the_output_plus_one_row_and_one_batch(tmp_path):
    """A memory-mapped 64x192x192 volume, 32x64x64 windows, 4 classes, float16 output: tracemalloc sees the output
    (18.9 MB), the float32 planes of one row of windows (32 planes, 18.9 MB) and one batch of windows, not a float32
    output plus a volume of summed weights (47 MB) and not two whole outputs."""
    shape, patch, classes, batch_size = (64, 192, 192), (32, 64, 64), 4, 2
    path = tmp_path / "image.npy"
    np.save(path, np.zeros((*shape, 1), dtype=np.float32))
    image = np.load(path, mmap_mode="r")
    window = np.full((batch_size, *patch, classes), 0.25, dtype=np.float32)
    tracemalloc.start()
    out = predict_volume(
        None, image, patch, classes, batch_size=batch_size, predict=lambda b: window[: len(b)], dtype="float16"
    )
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    output_bytes = np.prod(shape) * classes * 2
    batch_bytes = window.nbytes
    assert out.dtype == np.float16 and out.shape == (*shape, classes)
    np.testing.assert_allclose(out[::7, ::7, ::7].astype(np.float32), 0.25, atol=1e-3)
    row_bytes = patch[0] * shape[1] * shape[2] * classes * 4
    assert peak < output_bytes + row_bytes + 4 * batch_bytes, (peak, output_bytes, row_bytes, batch_bytes)


def test_probabilities_to_labels_matches_resampling_all_classes_at_once():
    rng = np.random.default_rng(4)
    probabilities = rng.dirichlet(np.ones(3), size=(6, 9, 7)).astype(np.float32)
    shape = (12, 14, 10)
    expected = np.argmax(resize_volume(probabilities, shape, 1), axis=-1)
    np.testing.assert_array_equal(probabilities_to_labels(probabilities, shape), expected)
    np.testing.assert_array_equal(probabilities_to_labels(probabilities, (6, 9, 7)), probabilities.argmax(-1))


@pytest.mark.parametrize(
    ("source", "target"),
    [((6, 9, 7), (12, 14, 10)), ((13, 9, 7), (5, 4, 11)), ((7, 8, 8), (7, 5, 12)), ((1, 6, 6), (3, 6, 6))],
)
def test_label_slabs_fed_in_uneven_slabs_equal_resampling_the_whole_volume(source, target):
    """Up- and down-sampling along Z and in-plane, slabs of 1, 2 and 3 planes: the labels of resampling everything at
    once, then the arg-max (the reference is skimage's trilinear resampling in :func:`resize_volume`)."""
    rng = np.random.default_rng(5)
    probabilities = rng.dirichlet(np.ones(3), size=source).astype(np.float32)
    expected = np.argmax(resize_volume(probabilities, target, 1), axis=-1)
    labels, start = LabelSlabs(source, target, 3), 0
    for size in itertools.cycle([1, 2, 3]):
        if start >= source[0]:
            break
        labels.add(start, probabilities[start : start + size])
        assert len(labels.planes) <= size + 1  # in-plane resampled planes not yet used: the slab and one before
        start += size
    np.testing.assert_array_equal(labels.result(), expected)


def test_label_slabs_refuse_slabs_out_of_order_and_missing_planes():
    labels = LabelSlabs((4, 5, 5), (8, 5, 5), 2)
    with pytest.raises(ValueError, match="expected plane 0"):
        labels.add(2, np.zeros((2, 5, 5, 2), np.float32))
    labels.add(0, np.zeros((2, 5, 5, 2), np.float32))
    with pytest.raises(ValueError, match="only 2 of 4 planes"):
        labels.result()


@pytest.mark.parametrize(
    ("shape", "patch", "batch_size"),
    [((7, 13, 11), (8, 8), 3), ((21, 13, 17), (8, 8, 8), 4), ((5, 6, 7), (8, 8, 8), 2), ((1, 20, 9), (8, 8), 5)],
)
def test_slabs_cover_the_volume_once_in_order_and_equal_the_whole_prediction(shape, patch, batch_size):
    rng = np.random.default_rng(6)
    image = rng.normal(size=(*shape, 1)).astype(np.float32)

    def soft(batch):  # depends on the window's content, so blending matters
        logits = np.concatenate([batch, -batch, 0.5 * batch**2], axis=-1)
        return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)

    whole = predict_volume(None, image, patch, 3, batch_size=batch_size, predict=soft, dtype="float32")
    covered = 0
    for start, block in predict_volume_slabs(None, image, patch, 3, batch_size=batch_size, predict=soft):
        assert start == covered and block.shape[1:] == (*shape[1:], 3)
        np.testing.assert_allclose(block, whole[start : start + len(block)], atol=1e-6)
        covered += len(block)
    assert covered == shape[0]
    target = (2 * shape[0], shape[1] - 1, shape[2] + 3)
    np.testing.assert_array_equal(
        predict_labels(None, image, patch, 3, target, batch_size=batch_size, predict=soft),
        probabilities_to_labels(whole, target),
    )


def test_predicting_labels_holds_one_row_of_windows_whatever_the_depth(tmp_path):
    """tracemalloc's peak of :func:`predict_labels` on memory-mapped 32x96x96 and 128x96x96 volumes (windows
    16x32x32, 4 classes): the same, about the float32 planes of one row of windows plus the labels, far below the
    probabilities of the deeper volume (18.9 MB in float32)."""
    patch, classes = (16, 32, 32), 4
    window = np.full((2, *patch, classes), 0.25, dtype=np.float32)
    peaks = []
    for depth in (32, 128):
        path = tmp_path / f"image_{depth}.npy"
        np.save(path, np.zeros((depth, 96, 96, 1), dtype=np.float32))
        image = np.load(path, mmap_mode="r")
        tracemalloc.start()
        labels = predict_labels(
            None, image, patch, classes, image.shape[:3], batch_size=2, predict=lambda b: window[: len(b)]
        )
        peaks.append(tracemalloc.get_traced_memory()[1] - labels.nbytes)
        tracemalloc.stop()
        assert labels.shape == (depth, 96, 96) and labels.dtype == np.uint8
    row_bytes = patch[0] * 96 * 96 * classes * 4
    assert peaks[1] < 1.2 * peaks[0] + 100_000, peaks
    assert peaks[1] < 2 * row_bytes + 4 * window.nbytes < 0.5 * 128 * 96 * 96 * classes * 4, peaks


def test_a_predict_function_with_the_wrong_output_shape_is_named():
    with pytest.raises(ValueError, match="predict returned shape"):
        predict_volume(None, np.zeros((4, 8, 8, 1), np.float32), (8, 8), 3, predict=lambda b: b)


def test_mirroring_chosen_axes_averages_the_flipped_predictions():
    """A 'model' that is not mirror-invariant (it marks where the intensity rises along the last axis): mirroring along
    axis 2 alone averages its prediction on the image with the flipped-back prediction on the flipped image."""

    def predict(batch):
        rising = np.diff(batch[..., 0], axis=-1, append=batch[..., -1:, 0]) > 0
        return np.stack([1.0 - rising, rising], axis=-1).astype(np.float32)

    image = np.random.default_rng(3).normal(size=(8, 8, 8, 1)).astype(np.float32)
    plain = predict(image[None])[0]
    flipped = np.flip(predict(np.flip(image, 2)[None])[0], 2)
    got = predict_volume(None, image, (8, 8, 8), 2, overlap=0.0, blend="constant", tta=[2], predict=predict)
    np.testing.assert_allclose(got, (plain + flipped) / 2, atol=1e-6)
    assert not np.allclose(got, plain)
    np.testing.assert_allclose(
        predict_volume(None, image, (8, 8, 8), 2, overlap=0.0, blend="constant", tta=[], predict=predict), plain
    )
    with pytest.raises(ValueError, match="not spatial axes"):
        predict_volume(None, image, (8, 8, 8), 2, tta=[3], predict=predict)


class CallRecorder:
    """A stand-in Keras model that records whether it was called eagerly or through ``predict_on_batch``; its
    output is a deep-supervision list whose first entry is the input plus one."""

    def __init__(self):
        self.calls = []

    def __call__(self, batch, training=False):
        self.calls.append(("eager", training))
        return [batch + 1.0, batch]

    def predict_on_batch(self, batch):
        self.calls.append(("compiled", None))
        return [batch + 1.0, batch]


@pytest.mark.parametrize(("distributed", "kind"), [(False, "compiled"), (True, "eager")])
def test_the_caller_says_whether_the_model_is_distributed(distributed, kind):
    """A model under a distribution strategy is called eagerly (its compiled step would split the batch over the
    devices); any other model goes through Keras's compiled predict function. Same numbers either way."""
    model = CallRecorder()
    image = np.random.default_rng(0).normal(size=(4, 8, 8, 2)).astype(np.float32)
    out = predict_volume(model, image, (8, 8), 2, overlap=0.0, blend="constant", distributed=distributed)
    np.testing.assert_allclose(out, image + 1.0, atol=1e-6)
    assert model.calls and {call[0] for call in model.calls} == {kind}
    assert all(training is not True for _, training in model.calls)

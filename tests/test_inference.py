"""Sliding-window inference: exact reproduction of an identity model, windows, blending, mirroring."""

import numpy as np
import pytest

from utils.inference import importance_map, predict_volume, sliding_window, window_starts


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
